"""The papers' original pipelines (docs/semantics.md, "Reproducing the papers' settings"):
LLaVA-NeXT's original anyres rule, the original conversation templates and `tokenizer_image_token`.

Every expectation is computed here from the rules as the original code states them (sizes as
(width, height), `int()` unpadding, chunks tokenised apart), never by calling mmlens' own helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import mmlens
from mmlens.inputs import AnyresGrid
from mmlens.testing import make_test_image

V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def original_canvas(width: int, height: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The original `select_best_resolution`: image size and pinpoints are (width, height); the
    first candidate wins ties. Returns the canvas (width, height)."""
    best, best_effective, best_wasted = None, -1, math.inf
    for canvas_width, canvas_height in pinpoints:
        scale = min(canvas_width / width, canvas_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_width * canvas_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_width, canvas_height), effective, wasted
    return best


def original_kept(width: int, height: int, rows: int, cols: int) -> tuple[int, int]:
    """The original `unpad_image` on a grid of rows x cols patches: kept rows and columns."""
    if width / height > cols / rows:
        padding = (rows - int(height * (cols / width))) // 2
        return rows - 2 * padding, cols
    padding = (cols - int(width * (rows / height))) // 2
    return rows, cols - 2 * padding


def original_n_tokens(width: int, height: int, tile: int = 336, patch: int = 14) -> int:
    canvas_width, canvas_height = original_canvas(width, height, V16_PINPOINTS)
    rows, cols = canvas_height // patch, canvas_width // patch
    kept_rows, kept_cols = original_kept(width, height, rows, cols)
    return (tile // patch) ** 2 + kept_rows * (kept_cols + 1)


@pytest.mark.parametrize(
    ("width", "height", "llava_tokens", "hf_tokens"),
    [(300, 200, 976, 1464), (704, 396, 1850, 1948), (640, 480, 2340, 2340)]  # 36 x 48 kept + 36 newlines,
)
def test_the_issues_measured_token_counts(width, height, llava_tokens, hf_tokens):
    counts = {
        rule: 576 + AnyresGrid.for_image((height, width), V16_PINPOINTS, 336, 14, rule).n_tokens
        for rule in ("llava", "hf")
    }
    assert counts == {"llava": llava_tokens, "hf": hf_tokens}


def test_anyres_llava_follows_the_original_rules_at_every_size():
    sizes = [(width, height) for width in range(20, 1100, 37) for height in range(20, 1100, 41)]
    differ = 0
    for width, height in sizes:
        grid = AnyresGrid.for_image((height, width), V16_PINPOINTS, 336, 14, "llava")
        canvas_width, canvas_height = original_canvas(width, height, V16_PINPOINTS)
        assert grid.tiles == (canvas_height // 336, canvas_width // 336), (width, height)
        rows, cols = original_kept(width, height, canvas_height // 14, canvas_width // 14)
        assert grid.unpadded_size == (rows, cols), (width, height)
        assert 576 + grid.n_tokens == original_n_tokens(width, height)
        hf = AnyresGrid.for_image((height, width), V16_PINPOINTS, 336, 14, "hf")
        differ += hf.n_tokens != grid.n_tokens
    assert differ > 0  # the rules really differ on some of these sizes


def test_anyres_rule_is_checked():
    with pytest.raises(ValueError, match="anyres='original'.*hf, llava"):
        AnyresGrid.for_image((20, 30), V16_PINPOINTS, 336, 14, "original")


# --- the tiny LLaVA-NeXT: pixels, tokens and packing of the original rule ----------------------


@pytest.fixture(scope="module")
def tiny_next(tiny_next_checkpoint):
    folder = tiny_next_checkpoint(family="vicuna")
    return mmlens.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def clip_normalise(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def test_prepare_with_anyres_llava_tiles_as_the_original(tiny_next):
    model, _ = tiny_next
    image = make_test_image(20, 14)  # both sides <= 28 px: the two 1x2 canvases tie
    inp = model.prepare(image, "What is it?", anyres="llava")
    hf_inp = model.prepare(image, "What is it?")
    # The original takes the first pinpoint [28, 56] as width 28, height 56: two tiles stacked.
    canvas_width, canvas_height = original_canvas(20, 14, [[28, 56], [56, 28]])
    assert (canvas_width, canvas_height) == (28, 56)
    scale_w, scale_h = canvas_width / 20, canvas_height / 14
    new_size = (28, min(math.ceil(14 * scale_w), 56)) if scale_w < scale_h else None
    canvas = Image.new("RGB", (canvas_width, canvas_height))
    canvas.paste(image.resize(new_size, Image.BICUBIC), (0, (canvas_height - new_size[1]) // 2))
    expected = [image.resize((28, 28), Image.BICUBIC)]  # the base crop
    expected += [canvas.crop((0, top, 28, top + 28)) for top in (0, 28)]
    expected_pixels = torch.stack([clip_normalise(crop) for crop in expected])
    assert inp.pixel_values.shape[1] == 3
    assert (inp.pixel_values[0] - expected_pixels).abs().max() < 1e-5
    # Tokens: 4 x 4 base patches; the 8 x 4 canvas grid keeps int(14 * 4 / 20) = 2 rows.
    rows, cols = original_kept(20, 14, 8, 4)
    assert (rows, cols) == (2, 4)
    assert len(inp.positions("image")) == 16 + rows * (cols + 1) == 26
    assert len(hf_inp.positions("image")) == 16 + 4 * (6 + 1) == 44  # HF: 1x2, 6 columns kept
    assert inp.anyres == "llava" and inp.model_kwargs()["anyres"] == "llava"
    assert "anyres" not in hf_inp.model_kwargs()


def test_model_packs_by_the_rule_of_the_input(tiny_next):
    model, _ = tiny_next
    inp = model.prepare(make_test_image(20, 14), "What is it?", anyres="llava")
    _, cache = model.run_with_cache(inp, names_filter="hook_image_embeds")
    with torch.no_grad():
        crops = model.projector(
            model.vision(
                inp.pixel_values[0],
                model.cfg.vision_feature_layers,
                model.cfg.vision_feature_select_strategy,
            )
        )
    # Independent packing: base crop, then canvas rows 3..4 of the two stacked tiles (8 x 4
    # patches, padding (8 - 2) // 2 = 3), each row followed by the newline embedding.
    canvas = torch.cat([crops[1].reshape(4, 4, -1), crops[2].reshape(4, 4, -1)])
    rows = [torch.cat([canvas[row], model.image_newline[None]]) for row in (3, 4)]
    expected = torch.cat([crops[0], *rows])
    assert (cache["hook_image_embeds"][0] - expected).abs().max() < 1e-5
    # The whole image's box covers every patch of both grids, none of the newlines.
    everything = inp.patches_in_box((0, 0, 20, 14))
    assert len(everything) == 16 + 2 * 4


def test_anyres_is_checked_where_it_applies(tiny_next, tiny_llava_dir):
    model, _ = tiny_next
    with pytest.raises(ValueError, match="anyres='tiles'"):
        model.prepare(make_test_image(20, 14), "What?", anyres="tiles")
    llava = mmlens.from_pretrained(tiny_llava_dir)
    with pytest.raises(ValueError, match="anyres applies to LLaVA-NeXT"):
        llava.prepare(make_test_image(20, 14), "What?", anyres="llava")
