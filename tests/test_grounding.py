"""Grounding measurements: mass of a map on the boxes' patches, and the pointing game."""

from __future__ import annotations

import torch

import mmlens
from mmlens.analysis import box_scores, last_row_attention_maps
from mmlens.zoo.shapes import generate


def test_box_scores_against_a_direct_count(tiny_checkpoint):
    model = mmlens.from_pretrained(tiny_checkpoint(n_layers=3, image_size=112))
    sample = generate(1, seed=5)[0]
    inp = model.prepare(sample.image, sample.question)
    maps = last_row_attention_maps(model, inp)
    scores = box_scores(model, inp, sample.boxes, maps)
    positions = torch.cat([inp.patches_in_box(box) for box in sample.boxes]).unique()
    _, cache = model.run_with_cache(inp, names_filter="blocks.1.attn.hook_pattern")
    row = cache["blocks.1.attn.hook_pattern"][0, :, -1].mean(0)
    image = inp.positions("image")
    expected = row[positions].sum() / row[image].sum()
    assert torch.allclose(scores["mass_in_box"][1], expected, atol=1e-5)
    assert scores["area_share"] == len(positions) / len(image)
    assert bool(scores["pointing_hit"][1]) == bool(
        torch.isin(image[row[image].argmax()], positions)
    )


def test_cliff_text_says_where_the_cliff_is_or_that_there_is_none():
    import pandas as pd

    from mmlens.analysis.cliff import CliffResult
    from mmlens.report import Analysed, _cliff_section

    curve = pd.DataFrame({"layer": [0, 1, 2], "accuracy": [0.2, 0.6, 1.0]})
    analysed = Analysed([0, 1, 3, 4, 5], answered_correctly=True)
    found = _cliff_section(CliffResult(curve, 1.0, cliff_layer=1, tolerance=0.02), analysed)
    assert "from layer 1 on, removing the image costs at most 2%" in found.text
    assert found.text.startswith("Accuracy of all 5 correctly answered samples when")
    none = _cliff_section(CliffResult(curve, 1.0, cliff_layer=None, tolerance=0.02), analysed)
    assert (
        "no cliff" in none.text
        and "from layer 1" not in none.text
        and "costs at most" not in none.text
    )
