"""LLaVA-1.5 image geometry modes, checked against pixels computed here with PIL and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import mmlens
from mmlens.inputs import box_from_xywh
from mmlens.testing import make_test_image

SIDE = 56  # the tiny checkpoint's input size
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint(n_layers=2))


@pytest.fixture(scope="module")
def wide():
    return make_test_image(88, 48, 4)  # width 88, height 48


def normalised(image: Image.Image) -> torch.Tensor:
    """`[1, 3, h, w]` CLIP-normalised pixels of an RGB image, as float32."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(((array - MEAN) / STD).astype(np.float32)).permute(2, 0, 1)[None]


def centre_crop(image: Image.Image, side: int) -> Image.Image:
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def test_pad_is_expand2square_with_the_mean_colour_then_crop(model, wide):
    square = Image.new("RGB", (88, 88), tuple(int(255 * m) for m in MEAN))
    square.paste(wide, (0, (88 - 48) // 2))
    expected = normalised(centre_crop(square.resize((SIDE, SIDE), Image.BICUBIC), SIDE))
    pad = model.prepare(wide, "Is it red?", image_mode="pad")
    assert pad.image_mode == "pad"
    assert (pad.pixel_values - expected).abs().max() < 1e-5


def test_crop_resizes_the_shorter_side_and_crops_the_longer(model, wide):
    resized = wide.resize((int(SIDE * 88 / 48), SIDE), Image.BICUBIC)
    expected = normalised(centre_crop(resized, SIDE))
    crop = model.prepare(wide, "Is it red?", image_mode="crop")
    assert (crop.pixel_values - expected).abs().max() < 1e-5


def test_squash_resizes_to_the_square(model, wide):
    expected = normalised(wide.resize((SIDE, SIDE), Image.BICUBIC))
    squash = model.prepare(wide, "Is it red?", image_mode="squash")
    assert (squash.pixel_values - expected).abs().max() < 1e-5


def test_boxes_follow_the_mode(model, wide):
    left_edge = (0, 10, 6, 30)  # 6 px at the left end: cropped away unless padded or squashed
    by_mode = {
        mode: model.prepare(wide, "Is it red?", image_mode=mode)
        for mode in ("pad", "crop", "squash")
    }
    assert len(by_mode["crop"].patches_in_box(left_edge)) == 0
    for mode in ("pad", "squash"):
        patches = by_mode[mode].patches_in_box(left_edge)
        columns = by_mode[mode].layout.col[torch.isin(by_mode[mode].layout.position, patches)]
        assert len(patches) > 0 and set(columns.tolist()) == {0}, mode
    with torch.no_grad():
        logits = {mode: model(inp)[0, -1] for mode, inp in by_mode.items()}
    assert not torch.equal(logits["pad"], logits["crop"])


def test_modes_are_checked(model, wide, tiny_next_checkpoint):
    with pytest.raises(ValueError, match="image_mode='letterbox'"):
        model.prepare(wide, "Is it red?", image_mode="letterbox")
    next_model = mmlens.from_pretrained(tiny_next_checkpoint())
    with pytest.raises(
        ValueError, match=r"image_mode=.pad. does not apply to this checkpoint.s tiling"
    ):
        next_model.prepare(wide, "Is it red?", image_mode="pad")


# ------------------------------------------------------------------------------------ boxes
def test_gqa_boxes_cover_what_pil_paints():
    x, y, w, h = 7, 3, 10, 4
    painted = Image.new("L", (40, 20))
    ImageDraw.Draw(painted).rectangle((x, y, x + w, y + h), fill=255)  # the paper's painting
    x0, y0, x1, y1 = box_from_xywh(x, y, w, h)
    expected = np.zeros((20, 40), dtype=bool)
    expected[y0:y1, x0:x1] = True
    assert np.array_equal(np.asarray(painted) == 255, expected)


def painted_patches(inp, box) -> set[int]:
    """The mask rule computed here with PIL: paint, pad, resize, crop, find pure red."""
    mask = Image.new("RGB", (88, 48))
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
    square = Image.new("RGB", (88, 88), tuple(int(255 * m) for m in MEAN))
    square.paste(mask, (0, 20))
    pixels = np.asarray(centre_crop(square.resize((SIDE, SIDE), Image.BICUBIC), SIDE))
    red = (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)
    grid = inp.layout.patch_grid(0)
    return {
        int(grid[row, col])
        for row in range(grid.shape[0])
        for col in range(grid.shape[1])
        if red[row * 14 : (row + 1) * 14, col * 14 : (col + 1) * 14].any()
    }


@pytest.mark.parametrize(
    "box", [(10, 10, 60, 40), (30, 5, 31, 45), (0, 0, 88, 2), (40, 20, 41, 21)]
)
def test_the_mask_rule_is_the_painted_red_patches(model, wide, box):
    inp = model.prepare(wide, "Is it red?", image_mode="pad")
    by_mask = inp.patches_in_box(box, rule="mask")
    assert set(by_mask.tolist()) == painted_patches(inp, box)
    assert set(by_mask.tolist()) <= set(inp.patches_in_box(box).tolist())
    if box[2] - box[0] == 1 or box[3] - box[1] <= 2:  # thin boxes: blurred away, nothing left
        assert len(by_mask) == 0 and len(inp.patches_in_box(box)) > 0
    else:
        assert len(by_mask) > 0
    with pytest.raises(ValueError, match="rule='outline'"):
        inp.patches_in_box(box, rule="outline")
