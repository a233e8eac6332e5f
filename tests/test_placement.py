"""Models on several devices (`device_map`): every module placed as the map says, the same
numbers as the single-device model, clear errors for incomplete or wrong maps. On this CPU-only
machine every device is the CPU; bench/devices.py checks a real GPU/CPU split where one is lent."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.models.placement import place
from mmlens.testing import build_tiny_instructblip, make_test_image

EXPLICIT = {
    "embed": "cpu",
    "vision": "cpu",
    "projector": "cpu",
    "image_newline": "cpu",
    "blocks.0": "cpu",
    "blocks.1": "cpu",
    "ln_final": "cpu",
    "unembed": "cpu",
}


@pytest.fixture(scope="module")
def folder(tiny_next_checkpoint):
    return tiny_next_checkpoint(family="llama3", n_kv_heads=2)


def test_an_explicit_map_runs_and_equals_the_single_device_model(folder):
    reference = mmlens.from_pretrained(folder)
    placed = mmlens.from_pretrained(folder, device_map=EXPLICIT)
    assert placed.device_map == EXPLICIT
    inp = placed.prepare([make_test_image(40, 30), make_test_image(30, 50)], ["Why?", "What?"])
    with torch.no_grad():
        assert torch.equal(placed(inp), reference(inp))
        tokens = placed.generate(inp, max_new_tokens=4)
        assert torch.equal(tokens, reference.generate(inp, max_new_tokens=4))


def test_prefixes_and_auto_cover_every_module(folder):
    model = mmlens.from_pretrained(folder, device_map={"": "cpu", "blocks": "cpu"})
    assert set(model.device_map) == set(EXPLICIT)
    assert set(mmlens.from_pretrained(folder, device_map="auto").device_map) == set(EXPLICIT)


def test_bad_maps_are_refused(folder):
    model = mmlens.from_pretrained(folder)
    with pytest.raises(ValueError, match="no device for 'embed'.*blocks.0"):
        place(model, {"blocks": "cpu"})
    with pytest.raises(ValueError, match="names \\['blockz'\\], which are not modules"):
        place(model, {"": "cpu", "blockz": "cpu"})
    with pytest.raises(ValueError, match="device_map='balanced'"):
        place(model, "balanced")


def test_instructblips_qformer_and_projection_are_placed_units(tmp_path):
    folder = build_tiny_instructblip(tmp_path)
    reference = mmlens.from_pretrained(folder)
    placed = mmlens.from_pretrained(folder, device_map="auto")
    assert {"qformer", "language_projection", "vision"} <= set(placed.device_map)
    inp = placed.prepare(make_test_image(40, 30), "Why?")
    with torch.no_grad():
        assert torch.equal(placed(inp), reference(inp))
