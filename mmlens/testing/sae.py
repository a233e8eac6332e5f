"""A random SAE in SAELens' format for any model's hook point (for tests of what runs with an
SAE on every family, such as the runner's ``sae-features``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def build_random_sae(
    folder: str | Path,
    model: Any,
    hook_name: str = "blocks.0.hook_resid_post",
    d_sae: int = 16,
    seed: int = 0,
) -> Path:
    """Write a ReLU SAE with `d_sae` random features, as wide as `model`'s activation at
    `hook_name`, to `folder` (``cfg.json`` + ``sae_weights.safetensors``); returns the folder.

    Examples:
        >>> from mmlens.testing.sae import build_random_sae
        >>> folder = build_random_sae("random-sae", model)
        >>> mmlens.sae.load(folder).cfg.d_in                # tiny-shapes' d_model
        128
    """
    from mmlens.sae import SAEConfig, SparseAutoencoder, save

    _, cache = model.run_with_cache(_any_input(model), names_filter=hook_name)
    d_in = cache[hook_name].shape[-1]
    generator = torch.Generator().manual_seed(seed)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator) / d_in**0.5,
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.randn(d_sae, d_in, generator=generator) / d_sae**0.5,
        "b_dec": torch.zeros(d_in),
    }
    config = SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae, hook_name=hook_name)
    return save(SparseAutoencoder(config, weights), folder)


def _any_input(model: Any) -> Any:
    from mmlens.testing.common import make_test_image

    return model.prepare(make_test_image(64, 48), "What is in the picture?")
