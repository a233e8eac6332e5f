"""The second organism, `tiny-shapes-routed`: tiny-shapes retrained so that the answer positions
do not attend to the image (masked, then penalised; docs/zoo.md), so image information reaches the
answer through the question tokens. It meets the same accuracy bar as tiny-shapes, and the
knockout analysis tells the two organisms apart, as their known routing says it must."""

from __future__ import annotations

import pytest
import torch
from test_zoo import ACCURACY_BAR, PER_TYPE, TEST_SEED

import mmlens
from mmlens.analysis import PAPER_FLOWS, PATCH_FLOWS, knockout_sweep
from mmlens.zoo.shapes import QUESTION_TYPES, generate
from train.evaluate import evaluate

N_SAMPLES = 42  # six of each question type
WINDOW = 3


@pytest.fixture(scope="module")
def organisms():
    torch.set_num_threads(2)
    return {name: mmlens.load(name) for name in ("tiny-shapes", "tiny-shapes-routed")}


@pytest.fixture(scope="module")
def drops(organisms):
    """Per organism and flow: the largest mean drop of p(answer) over window centres (%)."""
    samples = [s for s in generate(N_SAMPLES, seed=TEST_SEED + 1) if s.boxes]
    result = {}
    for name, model in organisms.items():
        inputs = [model.prepare(s.image, s.question) for s in samples]
        sweep = knockout_sweep(
            model,
            inputs,
            {**PAPER_FLOWS, **PATCH_FLOWS},
            WINDOW,
            boxes=[s.boxes for s in samples],
            progress=False,
        )
        means = sweep.groupby(["flow", "layer"]).relative_change.mean()
        result[name] = means.groupby("flow").min()
    return result


def test_routed_organism_meets_the_accuracy_bar(organisms):
    model = organisms["tiny-shapes-routed"]
    assert model.default_template == "llava_v1"
    evaluation = evaluate(model, generate(PER_TYPE * len(QUESTION_TYPES), seed=TEST_SEED))
    low = {kind: acc for kind, acc in evaluation.accuracy.items() if acc < ACCURACY_BAR}
    assert not low, f"below {ACCURACY_BAR:.0%}: {low}\n{evaluation.accuracy_table()}"


def test_knockout_tells_the_two_routings_apart(drops):
    direct, routed = drops["tiny-shapes"], drops["tiny-shapes-routed"]
    # tiny-shapes reads the image from the last position; the routed one cannot.
    assert direct["Image→Last"] < -50
    assert routed["Image→Last"] > -10
    # The routed one reads the image into the question tokens, the related patches above all.
    assert routed["Image→Question"] < -30
    assert routed["Related patches→Question"] < routed["Other patches→Question"] - 20
    assert direct["Image→Question"] > -10


def test_the_training_mask_hides_the_image_from_the_assistant_rows_only():
    """`shared_prefix_loss(mask_image=True)` (the routed recipe's first cycle) leaves the routed
    organism's loss as it is (its answer rows do not read the image) and breaks tiny-shapes'
    (which reads the image from the last position)."""
    from transformers import LlavaForConditionalGeneration

    from mmlens.zoo import checkpoint_path
    from mmlens.zoo.shapes import conversation
    from train.train_shapes import make_processor, shared_prefix_loss

    processor = make_processor()
    samples = generate(3, seed=TEST_SEED + 2)
    conversations = [conversation(sample, 4) for sample in samples]
    losses = {}
    for name in ("tiny-shapes", "tiny-shapes-routed"):
        hf = LlavaForConditionalGeneration.from_pretrained(checkpoint_path(name))
        with torch.no_grad():
            losses[name] = [
                shared_prefix_loss(hf, processor, samples, conversations, mask_image=mask).item()
                for mask in (False, True)
            ]
    plain, masked = losses["tiny-shapes-routed"]
    assert abs(masked - plain) < 1e-3 and plain < 0.5
    plain, masked = losses["tiny-shapes"]
    assert plain < 0.5 and masked > plain + 2
