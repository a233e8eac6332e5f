"""LLaVA-1.5 image geometry modes, checked against pixels computed here with PIL and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmlens
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
    with pytest.raises(ValueError, match="LLaVA-NeXT processor tiles the image"):
        next_model.prepare(wide, "Is it red?", image_mode="pad")
