"""Every experiment of the runner on every model family beyond LLaVA-1.5 and LLaVA-NeXT
(whose runs tests/test_experiments.py covers): LLaVA-Interleave (SigLIP + Qwen2),
LLaVA-OneVision, InstructBLIP, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, the original Qwen-VL,
Gemma 3, InternVL and an original InternVL2 release, each on a random checkpoint; every sample must give rows."""

from __future__ import annotations

import warnings

import pytest

import mmlens
from mmlens.experiments import EXPERIMENTS
from mmlens.testing import (
    build_tiny_gemma3,
    build_tiny_instructblip,
    build_tiny_internvl,
    build_tiny_internvl_release,
    build_tiny_llava_interleave,
    build_tiny_llava_onevision,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
    build_tiny_qwen_vl,
)
from mmlens.testing.sae import build_random_sae

BUILDERS = {
    "interleave": build_tiny_llava_interleave,
    "onevision": build_tiny_llava_onevision,
    "instructblip": build_tiny_instructblip,
    "qwen2_vl": build_tiny_qwen2_vl,
    "qwen2_5_vl": build_tiny_qwen2_5_vl,
    "qwen3_vl": build_tiny_qwen3_vl,
    "qwen_vl": build_tiny_qwen_vl,
    "gemma3": build_tiny_gemma3,
    "internvl": build_tiny_internvl,
    "internvl_release": build_tiny_internvl_release,
}
SMALL = {  # options that keep each run to a few forward passes
    "knockout": dict(window_size=1),
    "module-jaccard": dict(window=1),
    "cam": dict(layers=[0, "vision.blocks.0"], noise_std=0.0, n_samples=1),
    "truncation": dict(layers=[0], keep=0),
    "fastv": dict(k=1),  # the paper's k=2 is past these 2-layer decoders
}


def options(experiment, model, folder):
    """`SMALL`'s options; ``sae-features`` gets a random SAE as wide as the model."""
    if experiment == "sae-features":
        return dict(sae=str(build_random_sae(folder / "sae", model)))
    return SMALL.get(experiment, {})


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request, tmp_path_factory):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return mmlens.from_pretrained(folder)


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_every_experiment_runs(model, experiment, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed sample is a warning: make it fail the test
        result = mmlens.run(
            experiment, model, "shapes:3", tmp_path, correct_only=False, batch_size=2,
            progress=False, **options(experiment, model, tmp_path),
        )  # fmt: skip
    assert len(result) > 0 and result["sample_id"].nunique() == 3
