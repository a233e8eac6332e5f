"""Activation patching (mmlens.patching) equals the explicit one-forward-per-cell loop, costs a
few batched forward passes, aligns prompts of different lengths by segment, and comes with
counterfactual pairs whose answer change is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import ImageChops

import mmlens
from mmlens.patching import (
    HEAD_SITES,
    SITES,
    activation_patching,
    aligned_positions,
    logit_difference,
)
from mmlens.zoo.shapes import counterfactual, generate


@pytest.fixture(scope="module")
def model():
    return mmlens.load("tiny-shapes")


@pytest.fixture(scope="module")
def pair(model):
    clean_sample = generate(1, seed=0)[0]
    corrupted_sample = counterfactual(clean_sample)
    clean = model.prepare(clean_sample.image, clean_sample.question)
    corrupted = model.prepare(corrupted_sample.image, corrupted_sample.question)
    return clean, corrupted, logit_difference(model, clean, "red", "blue")


def explicit(model, clean, corrupted, metric, site, layer, clean_positions, positions, head):
    """One forward pass of the corrupted prompt with one cell patched in by hand."""
    name = SITES[site].format(layer=layer)
    _, cache = model.run_with_cache(clean, names_filter=name)

    def patch(activation, hook):
        activation = activation.clone()
        index = (0, positions) if head is None else (0, positions, head)
        source = (0, clean_positions) if head is None else (0, clean_positions, head)
        activation[index] = cache[name][source]
        return activation

    with torch.no_grad():
        return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])).item()


@pytest.mark.parametrize("by", ["segment", "position"])
def test_patching_equals_the_explicit_loop(model, pair, by):
    clean, corrupted, metric = pair
    sites = ("resid_pre", "attn_out", "mlp_out", "head", "q", "k", "v")
    result = activation_patching(
        model, clean, corrupted, metric, sites=sites, by=by, layers=[1, 5], progress=False
    )
    pairs, unaligned = aligned_positions(clean, corrupted)
    assert unaligned == {}
    every_clean = torch.cat([here for here, _ in pairs.values()])
    every_corrupted = torch.cat([there for _, there in pairs.values()])
    checked = 0
    for row in result.itertuples():
        if row.site in HEAD_SITES:
            here, there, head = every_clean, every_corrupted, int(row.head)
        elif by == "segment":
            (here, there), head = pairs[row.unit], None
        else:
            there = torch.tensor([row.unit])
            here, head = every_clean[every_corrupted == row.unit], None
        if by == "position" and row.site not in HEAD_SITES and row.unit % 9:
            continue  # every ninth position is enough for the loop
        expected = explicit(model, clean, corrupted, metric, row.site, row.layer, here, there, head)
        assert math.isclose(row.metric, expected, abs_tol=1e-4), row
        checked += 1
    assert checked >= 20
    n_units = len(pairs) if by == "segment" else len(every_corrupted)
    assert len(result) == 2 * (3 * n_units + 4 * model.cfg.n_heads)


def test_a_sweep_costs_a_few_batched_forwards(model, pair):
    clean, corrupted, metric = pair
    full, first_blocks = [], []
    handles = [
        model.hook_embed.register_forward_hook(lambda *args: full.append(1)),
        model.blocks[0].hook_resid_pre.register_forward_hook(lambda *args: first_blocks.append(1)),
    ]
    try:
        result = activation_patching(model, clean, corrupted, metric, batch_size=32, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    cells = len(result)
    assert cells == 3 * model.cfg.n_layers * 5  # system, image, question, between, last
    # Two full passes (clean, corrupted prefix), then one suffix run per 32 cells.
    assert len(full) == 2 and result.attrs["suffix_runs"] == math.ceil(cells / 32)
    assert len(first_blocks) == 2 + result.attrs["suffix_runs"]


def test_clean_and_corrupted_differ_only_in_the_image(model, pair):
    """On a counterfactual pair, patching the image at layer 0 restores the clean run exactly,
    and every other segment at layer 0 changes nothing."""
    clean, corrupted, metric = pair
    result = activation_patching(
        model, clean, corrupted, metric, sites=["resid_pre"], layers=[0], progress=False
    )
    restored = dict(zip(result.unit, result.normalized, strict=True))
    assert restored.pop("image") == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(list(restored.values()), 0.0, atol=1e-5)
    assert result.attrs["clean"] > 0 > result.attrs["corrupted"]


def test_prompts_of_different_lengths_are_aligned_by_segment(model, pair):
    clean, _, _ = pair
    sample = generate(1, seed=0)[0]
    longer = model.prepare(sample.image, "Is the large star blue or red?")
    pairs, unaligned = aligned_positions(clean, longer)
    assert unaligned == {"question": (7, 8)}
    assert list(pairs) == ["system", "image", "between", "last"]
    assert pairs["last"][0].item() + 1 == pairs["last"][1].item()
    metric = logit_difference(model, clean, "red", "blue")
    corrupted = model.prepare(counterfactual(sample).image, "Is the large star blue or red?")
    result = activation_patching(
        model, clean, corrupted, metric, sites=["resid_pre"], layers=[3], progress=False
    )
    assert set(result.unit) == {"system", "image", "between", "last"}
    assert result.attrs["unaligned"] == {"question": (7, 8)}
    last = result[result.unit == "last"].metric.item()
    here, there = pairs["last"]
    expected = explicit(model, clean, corrupted, metric, "resid_pre", 3, here, there, None)
    assert math.isclose(last, expected, abs_tol=1e-4)


def test_bad_requests_are_refused(model, pair):
    clean, corrupted, metric = pair
    with pytest.raises(ValueError, match="sites must be among"):
        activation_patching(model, clean, corrupted, metric, sites=["resid_post"])
    with pytest.raises(ValueError, match="by 'segment' or 'position'"):
        activation_patching(model, clean, corrupted, metric, by="head")
    batch = model.prepare([generate(1)[0].image] * 2, ["Why?", "How?"])
    with pytest.raises(ValueError, match="holds 2 prompts"):
        activation_patching(model, batch, corrupted, metric)
    with pytest.raises(ValueError, match="nothing for patching to restore"):
        activation_patching(model, clean, clean, metric)


def test_counterfactual_pairs_change_one_object_and_the_answer(model):
    samples = generate(40, seed=3, question_types=["ChooseAttr", "QueryAttr"])
    samples = [s for s in samples if s.subtype == "color"]
    assert len(samples) >= 15
    for sample in samples:
        other = counterfactual(sample)
        assert other.question == sample.question and other.answer != sample.answer
        difference = ImageChops.difference(sample.image, other.image).getbbox()
        x0, y0, x1, y1 = sample.boxes[0]
        assert difference is not None
        assert x0 - 1 <= difference[0] and difference[2] <= x1 + 1
        assert y0 - 1 <= difference[1] and difference[3] <= y1 + 1
    inputs = model.prepare(
        [counterfactual(s).image for s in samples], [s.question for s in samples]
    )
    predicted = model.to_string(model(inputs)[:, -1].argmax(-1)[:, None])
    correct = [
        p.strip() == counterfactual(s).answer for p, s in zip(predicted, samples, strict=True)
    ]
    assert sum(correct) >= 0.9 * len(samples)
    with pytest.raises(ValueError, match="ChooseAttr and QueryAttr colour questions"):
        counterfactual(generate(1, seed=0, question_types=["Exist"])[0])
