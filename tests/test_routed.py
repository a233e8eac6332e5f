"""The second organism, `tiny-shapes-routed`: trained like `tiny-shapes` but with the answer
positions penalised for attending to the image, so image information reaches the answer through
the question tokens. The knockout analysis tells the two organisms apart, as their known routing
says it must. Its accuracy does not reach the project's 95% bar on every type yet (docs/zoo.md):
the test holds it at what the shipped weights do, so that a regression shows."""

from __future__ import annotations

import pytest
import torch
from test_zoo import PER_TYPE, TEST_SEED

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


ROUTED_FLOORS = {
    "ChooseAttr": 0.95,
    "ChooseCat": 0.90,
    "ChooseRel": 0.45,
    "CompareAttr": 0.90,
    "LogicalObj": 0.80,
    "QueryAttr": 0.75,
    "Exist": 0.95,
}
"""What the shipped weights must keep on the test seed (measured there: docs/zoo.md), a few
points under each measured score; ChooseRel, LogicalObj and QueryAttr are below `ACCURACY_BAR`."""


def test_routed_organism_loads_and_keeps_its_accuracy(organisms):
    model = organisms["tiny-shapes-routed"]
    assert model.default_template == "llava_v1"
    evaluation = evaluate(model, generate(PER_TYPE * len(QUESTION_TYPES), seed=TEST_SEED))
    low = {kind: acc for kind, acc in evaluation.accuracy.items() if acc < ROUTED_FLOORS[kind]}
    assert not low, f"below the floors {ROUTED_FLOORS}: {low}\n{evaluation.accuracy_table()}"


def test_knockout_tells_the_two_routings_apart(drops):
    direct, routed = drops["tiny-shapes"], drops["tiny-shapes-routed"]
    # tiny-shapes reads the image from the last position; the routed one cannot.
    assert direct["Image→Last"] < -50
    assert routed["Image→Last"] > -10
    # The routed one reads the image into the question tokens, the related patches above all.
    assert routed["Image→Question"] < -15
    assert routed["Related patches→Question"] < routed["Other patches→Question"]
    assert direct["Image→Question"] > -10
