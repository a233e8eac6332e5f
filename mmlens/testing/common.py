"""What the tiny checkpoint builders share: the standard test images (`make_test_image`,
`TEST_IMAGE_SIZES`), CLIP's pixel settings, the vision configs (CLIP, SigLIP) and decoder configs
(Llama / Mistral of a family, Qwen2) more than one model family uses, and random weights far
from the default initialisation (`_save_random_model`, `_randomize_weights`; the draw is
described in `mmlens.testing.llava.build_tiny_llava`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, MistralConfig, PreTrainedTokenizerFast
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from mmlens.testing.tokenizer import _check_family

TEST_IMAGE_SIZES = {"square": (56, 56), "wide": (88, 48), "tall": (40, 80)}
"""(width, height) of the standard test images. Padded to a square of side 56, 88 or 80 and
resized to 56, no pixel centre of these images lands exactly on a border between processed pixels
(the side is a multiple of 8), so a box-filter resize (the `patches_in_box` test oracle) has no
ties to break; a 90 x 50 image would have some."""


def make_test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: a colour gradient with red, green and blue rectangles.

    Examples:
        >>> make_test_image(*TEST_IMAGE_SIZES["wide"]).size
        (88, 48)
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gradient = [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), np.full(x.shape, 128.0)]
    pixels = np.stack(gradient, axis=-1)
    for colour in ([230, 30, 30], [30, 200, 60], [40, 60, 230]):
        x0, y0 = rng.integers(0, width - width // 4), rng.integers(0, height - height // 4)
        pixels[y0 : y0 + height // 4, x0 : x0 + width // 4] = colour
    return Image.fromarray(pixels.astype(np.uint8))


_CLIP_PIXELS = dict(
    resample=PILImageResampling.BICUBIC,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    do_convert_rgb=True,
)
"""Resampling, rescaling and normalisation shared by llava-1.5's and llava-NeXT's processors."""

_FAMILY_ROPE_THETA = {"vicuna": 10000.0, "mistral": 1e6, "llama3": 500000.0}


def _clip_config(
    n_layers: int, d_model: int, n_heads: int, image_size: int, patch_size: int
) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        projection_dim=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _decoder_config(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None,
    d_mlp: int,
    rope_theta: float | None,
    sliding_window: int | None = None,
) -> LlamaConfig | MistralConfig:
    """The decoder config of `family` (Mistral for "mistral", Llama otherwise)."""
    _check_family(family)
    if sliding_window is not None and family != "mistral":
        raise ValueError(f"sliding_window is a Mistral setting; family {family!r} has none")
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta or _FAMILY_ROPE_THETA[family],
        },
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        return MistralConfig(**shape, sliding_window=sliding_window)
    return LlamaConfig(**shape)


def _siglip_config(n_layers: int, d_model: int, n_heads: int, image_size: int, patch_size: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, image_size=image_size, patch_size=patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )  # fmt: skip


def _qwen2_config(
    tokenizer: PreTrainedTokenizerFast,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_mlp: int,
    tie_word_embeddings: bool,
):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
        num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, max_position_embeddings=512, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_sliding_window=False, sliding_window=64,
    )  # fmt: skip


def _save_random_model(model_class: type, config: Any, path: Path, seed: int) -> None:
    """Build `model_class(config)` with weights drawn from `seed` (see `build_tiny_llava`), save it."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _randomize_weights(model)
    model.save_pretrained(path)


@torch.no_grad()
def _randomize_weights(model: torch.nn.Module) -> None:
    """Non-trivial random weights (see `build_tiny_llava`), drawn from the global torch RNG."""
    for name, parameter in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rsplit(".", 2)[-2] if "." in name else ""
        is_norm = "norm" in owner.lower()  # BERT's (the Q-Former's) are "LayerNorm"
        if is_norm and leaf == "weight":
            parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
        elif is_norm and leaf == "bias":
            parameter.normal_(0.0, 0.1)
        elif leaf == "bias":
            parameter.normal_(0.0, 0.05)
        else:
            parameter.normal_(0.0, 0.15)
