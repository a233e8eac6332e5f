"""Shared fixtures: tiny random llava-hf checkpoints (built offline, once per session) and images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlens.testing import build_tiny_llava

# Test image sizes. After padding to a square of side M and resizing to 56, no pixel centre of
# these images lands exactly on a processed-pixel boundary (M = 56, 88 and 80 are multiples of 8,
# see tests/test_inputs.py::test_test_images_avoid_resampling_ties), so PIL's box filter (the
# patches_in_box oracle) has no ties to break.
IMAGE_SIZES = {"square": (56, 56), "wide": (88, 48), "tall": (40, 80)}  # (width, height)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_checkpoint(**overrides)` -> folder of `build_tiny_llava(folder, **overrides)`.

    Each distinct set of overrides is built once per session.

    Example:
        >>> folder = tiny_checkpoint(n_kv_heads=2, vision_feature_select_strategy="full")
    """
    built: dict[str, Path] = {}

    def build(**overrides: object) -> Path:
        key = repr(sorted(overrides.items()))
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-llava-{len(built)}")
            built[key] = build_tiny_llava(folder, **overrides)
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    """The default tiny checkpoint (`build_tiny_llava` defaults)."""
    return tiny_checkpoint()


def make_test_image(width: int, height: int, seed: int) -> Image.Image:
    """A deterministic RGB image: a colour gradient with three coloured rectangles."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack(
        [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), np.full(x.shape, 128.0)],
        axis=-1,
    )
    for colour in ([230, 30, 30], [30, 200, 60], [40, 60, 230]):
        x0, y0 = rng.integers(0, width - width // 4), rng.integers(0, height - height // 4)
        pixels[y0 : y0 + height // 4, x0 : x0 + width // 4] = colour
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three deterministic RGB images: square 56x56, wide 88x48 and tall 40x80 (width x height)."""
    return [make_test_image(w, h, seed) for seed, (w, h) in enumerate(IMAGE_SIZES.values())]
