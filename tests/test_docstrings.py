"""Every docstring example in the package runs as a doctest, outputs compared.

Examples share the names the API reference states (docs/api/mmlens.md): `model` is
``mmlens.load("tiny-shapes")``, `sample` the first `mmlens.zoo.shapes.generate(1, seed=0)` sample
("Is the star blue or red?", answer "red"), `image` its image and `inp` ``model.prepare(image,
sample.question)``, and `next_model` a random LLaVA-NeXT (`mmlens.testing.build_tiny_llava_next`,
28 px base crop, 7 px patches) and `onevision_model` a random LLaVA-OneVision
(`build_tiny_llava_onevision`, at "tiny-llava-onevision" in the workspace) and `blip_model` a
random InstructBLIP (`build_tiny_instructblip`, 8 query tokens, at "tiny-instructblip"),
`qwen_vl` a random original Qwen-VL-Chat release (`build_tiny_qwen_vl`, 16 queries, 6 x 6
patches, at `qwen_vl_folder`, "tiny-qwen-vl"), `internvl` a random InternVL
(`build_tiny_internvl`, 56 px crops of 7 px patches, 4 x 4 tokens each, at "tiny-internvl"). They run in a scratch folder that holds small files in the published layouts at
the paths the examples name (`docs_workspace.build`), so a loader's example reads a real file.
"""

from __future__ import annotations

import copy
import doctest
import importlib
import io
import pkgutil

import pytest
import torch
from published_formats import build_workspace

import mmlens
from mmlens.testing import (
    build_tiny_instructblip,
    build_tiny_internvl,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen_vl,
)
from mmlens.zoo.shapes import generate

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def package_doctests() -> list[doctest.DocTest]:
    """The doctests of every module of mmlens, each found once (in the module that defines it)."""
    finder = doctest.DocTestFinder()
    found = []
    for module_info in pkgutil.walk_packages(mmlens.__path__, "mmlens."):
        if module_info.name == "mmlens.__main__":
            continue
        module = importlib.import_module(module_info.name)
        for test in finder.find(module):
            defined_here = (
                test.name == module.__name__
                or getattr(_lookup(module, test.name), "__module__", module.__name__)
                == module.__name__
            )
            if test.examples and defined_here:
                found.append(test)
    return sorted(found, key=lambda test: test.name)


def _lookup(module, dotted: str):
    target = module
    for part in dotted[len(module.__name__) + 1 :].split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return getattr(target, "__func__", target)


DOCTESTS = package_doctests()


def test_the_package_has_examples():
    assert len(DOCTESTS) > 100


@pytest.fixture(scope="module")
def shared_names() -> dict[str, object]:
    model = mmlens.load("tiny-shapes")
    sample = generate(1, seed=0)[0]
    return {"mmlens": mmlens, "torch": torch, "model": model, "sample": sample}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return build_workspace(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="module")
def next_model(workspace):
    return mmlens.from_pretrained(build_tiny_llava_next(workspace / "tiny-llava-next"))


@pytest.fixture(scope="module")
def onevision_model(workspace):
    return mmlens.from_pretrained(build_tiny_llava_onevision(workspace / "tiny-llava-onevision"))


@pytest.fixture(scope="module")
def blip_model(workspace):
    return mmlens.from_pretrained(build_tiny_instructblip(workspace / "tiny-instructblip"))


@pytest.fixture(scope="module")
def qwen_vl_folder(workspace):
    return build_tiny_qwen_vl(workspace / "tiny-qwen-vl")


@pytest.fixture(scope="module")
def qwen_vl(qwen_vl_folder):
    return mmlens.from_pretrained(qwen_vl_folder)


@pytest.fixture(scope="module")
def internvl(workspace):
    return mmlens.from_pretrained(build_tiny_internvl(workspace / "tiny-internvl"))


@pytest.mark.parametrize("test", DOCTESTS, ids=[test.name for test in DOCTESTS])
def test_docstring_example_runs(
    test,
    shared_names,
    workspace,
    next_model,
    onevision_model,
    blip_model,
    qwen_vl_folder,
    qwen_vl,
    internvl,
    monkeypatch,
):
    monkeypatch.chdir(workspace)
    model, sample = shared_names["model"], shared_names["sample"]
    test = copy.copy(test)
    test.globs = {
        **test.globs,
        **shared_names,
        "image": sample.image,
        "inp": model.prepare(sample.image, sample.question),
        "next_model": next_model,
        "onevision_model": onevision_model,
        "blip_model": blip_model,
        "qwen_vl_folder": qwen_vl_folder,
        "qwen_vl": qwen_vl,
        "internvl": internvl,
    }
    skipped = [example.source for example in test.examples if example.options.get(doctest.SKIP)]
    assert not skipped, f"examples must run, not be skipped: {skipped}"
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    try:
        runner.run(test, out=report.write, clear_globs=True)
    finally:
        model.reset_hooks(including_permanent=True)
    assert runner.failures == 0, report.getvalue()
