"""Steering hooks equal hand-written ones (adding, projecting out, clamping), keep their
positions under pruning and generation; difference-of-means vectors equal the means by hand;
linear probes find where each organism keeps the asked object's colour (tiny-shapes: the last
position; tiny-shapes-routed: the question first, then the last position)."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.ablations import drop_tokens
from mmlens.probes import fit_probes
from mmlens.steering import difference_of_means, segment_means, steer
from mmlens.zoo.shapes import generate


@pytest.fixture(scope="module")
def model():
    return mmlens.load("tiny-shapes")


@pytest.fixture(scope="module")
def inp(model):
    sample = generate(1, seed=0)[0]
    return model.prepare(sample.image, sample.question)


def direction(seed=0):
    return torch.randn(128, generator=torch.Generator().manual_seed(seed))


def test_add_equals_a_hand_written_hook(model, inp):
    vector, positions = direction(), inp.positions("question")

    def by_hand(x, hook):
        x = x.clone()
        x[0, positions] += 3.0 * vector
        return x

    with torch.no_grad():
        expected = model.run_with_hooks(inp, fwd_hooks=[("blocks.2.hook_resid_post", by_hand)])
        steered = model.run_with_hooks(inp, fwd_hooks=steer(vector, 2, positions, coefficient=3.0))
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=0)
    assert (steered - model(inp)).abs().max() > 0.1


def test_project_out_and_clamp_set_the_component(model, inp):
    vector = direction(1)
    unit = vector / vector.norm()
    for mode, value in (("project_out", 0.0), ("clamp", 2.5)):
        hooks = steer(vector, [1, 3], mode=mode, value=value, site="resid_mid")
        with model.hooks(fwd_hooks=hooks):
            _, cache = model.run_with_cache(inp)
        for layer in (1, 3):
            along = cache[f"blocks.{layer}.hook_resid_mid"][0] @ unit
            torch.testing.assert_close(along, torch.full_like(along, value), atol=1e-4, rtol=0)
        untouched = cache["blocks.2.hook_resid_mid"][0] @ unit
        assert (untouched - value).abs().max() > 0.1


def test_steering_keeps_its_positions_under_pruning(model, inp):
    vector, question = direction(2), inp.positions("question")
    image = inp.positions("image")
    kept = torch.tensor([p for p in range(inp.input_ids.shape[1]) if p not in set(image.tolist())])

    def by_hand(x, hook):  # after the image is dropped, row r holds original position kept[r]
        x = x.clone()
        rows = torch.isin(kept, question).nonzero().flatten()
        x[0, rows] += vector
        return x

    pruned = drop_tokens(image, from_layer=1)
    with torch.no_grad():
        steered = model.run_with_hooks(inp, fwd_hooks=pruned + steer(vector, 3, question))
        expected = model.run_with_hooks(
            inp, fwd_hooks=pruned + [("blocks.3.hook_resid_post", by_hand)]
        )
    torch.testing.assert_close(steered, expected, atol=1e-5, rtol=0)


def test_steering_every_position_reaches_the_generated_tokens(model, inp):
    hooks = steer(direction(3), [2, 4], coefficient=2.0)
    n, new = inp.input_ids.shape[1], 4
    with model.hooks(fwd_hooks=hooks):
        generated = model.generate(inp, max_new_tokens=new, stop_at_eos=False)
        forced = model(inp.with_tokens(generated[:, n:]))
    assert torch.equal(forced[:, -new - 1 : -1].argmax(-1), generated[:, n:])
    plain = model.generate(inp, max_new_tokens=new, stop_at_eos=False)
    assert not torch.equal(plain, generated)  # the steering changed what it says


def test_difference_of_means_is_the_means_by_hand(model):
    samples = generate(6, seed=4, question_types=["Exist"])
    inputs = [model.prepare(s.image, s.question) for s in samples]
    positive, negative = inputs[:3], inputs[3:]
    vector = difference_of_means(model, positive, negative, layer=2, segment="question")

    def mean_of(group):
        rows = []
        for item in group:
            _, cache = model.run_with_cache(item, names_filter="blocks.2.hook_resid_post")
            rows.append(cache["blocks.2.hook_resid_post"][0, item.positions("question")].mean(0))
        return torch.stack(rows).mean(0)

    torch.testing.assert_close(vector, mean_of(positive) - mean_of(negative), atol=1e-5, rtol=0)
    batch = model.prepare([s.image for s in samples], [s.question for s in samples])
    torch.testing.assert_close(
        segment_means(model, [batch], [2], "question"),
        segment_means(model, inputs, [2], "question"),
        atol=1e-4,
        rtol=0,
    )


@pytest.mark.parametrize(
    "organism, question_from, last_from",
    [("tiny-shapes", None, 1), ("tiny-shapes-routed", 1, 2)],
)
def test_probes_find_where_each_organism_keeps_the_colour(organism, question_from, last_from):
    organism_model = mmlens.load(organism)
    samples = [
        s for s in generate(200, seed=7, question_types=["QueryAttr"]) if s.subtype == "color"
    ]
    inputs = [organism_model.prepare(s.image, s.question) for s in samples]
    result = fit_probes(
        organism_model, inputs, [s.answer for s in samples], segments=["question", "last"]
    )
    accuracy = result.pivot(index="layer", columns="segment", values="test_accuracy")
    chance = result.chance.iloc[0]
    assert chance < 0.2 and result.n_test.iloc[0] == 29
    # Measured: tiny-shapes reads the colour at the last position from layer 1 (1.00) and
    # never at the question (at most 0.34); the routed organism has it at the question from
    # layer 1 (1.00) and at the last position from layer 2 (0.93, then 1.00).
    assert (accuracy["last"].loc[last_from:] > 0.9).all()
    assert (accuracy["last"].loc[: last_from - 1] < 0.5).all()
    if question_from is None:
        assert accuracy["question"].max() < 0.5
    else:
        assert (accuracy["question"].loc[question_from:] > 0.9).all()
        assert accuracy["question"].loc[0] < 0.5
    probe = result.attrs["probes"][(5, "last")]
    assert probe.direction.shape == (len(result.attrs["classes"]), 128)


def test_errors(model, inp):
    with pytest.raises(ValueError, match="site 'resid'"):
        steer(direction(), 1, site="resid")
    with pytest.raises(ValueError, match="non-zero direction"):
        steer(torch.zeros(128), 1, mode="project_out")
    with pytest.raises(ValueError, match="direction has 64 entries"):
        model.run_with_hooks(inp, fwd_hooks=steer(torch.ones(64), 1))
    with pytest.raises(ValueError, match="one label per input"):
        fit_probes(model, [inp], ["a", "b"])
    with pytest.raises(ValueError, match="one class"):
        fit_probes(model, [inp, inp], ["a", "a"])
