"""Shared fixtures: tiny random llava-hf checkpoints (built offline, once per session) and images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmlens.testing import (
    TEST_IMAGE_SIZES,
    build_tiny_llava,
    build_tiny_llava_next,
    make_test_image,
)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models are dominated by per-op overhead: one thread is faster, and ~100x faster
    when other processes share the CPU (oversubscribed threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_checkpoint(**overrides)` -> folder of `build_tiny_llava(folder, **overrides)`.

    Each distinct set of overrides is built once per session.

    Example:
        >>> folder = tiny_checkpoint(n_kv_heads=2, vision_feature_select_strategy="full")
    """
    return _build_once_per_overrides(tmp_path_factory, build_tiny_llava, "tiny-llava")


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    """The default tiny checkpoint (`build_tiny_llava` defaults)."""
    return tiny_checkpoint()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    """Three deterministic RGB images: square 56x56, wide 88x48 and tall 40x80 (width x height)."""
    return [make_test_image(w, h, seed) for seed, (w, h) in enumerate(TEST_IMAGE_SIZES.values())]


@pytest.fixture(scope="session")
def tiny_next_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_next_checkpoint(**overrides)` -> folder of `build_tiny_llava_next`.

    Each distinct set of overrides is built once per session.

    Example:
        >>> folder = tiny_next_checkpoint(family="llama3", n_kv_heads=2)
    """
    return _build_once_per_overrides(tmp_path_factory, build_tiny_llava_next, "tiny-llava-next")


def _build_once_per_overrides(
    tmp_path_factory: pytest.TempPathFactory, builder: Callable[..., Path], name: str
) -> Callable[..., Path]:
    """`build(**overrides)` -> `builder(new folder, **overrides)`, memoised on the overrides."""
    built: dict[str, Path] = {}

    def build(**overrides: object) -> Path:
        key = repr(sorted(overrides.items()))
        if key not in built:
            built[key] = builder(tmp_path_factory.mktemp(f"{name}-{len(built)}"), **overrides)
        return built[key]

    return build
