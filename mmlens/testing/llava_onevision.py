"""Tiny random LLaVA-OneVision checkpoints (`build_tiny_llava_onevision`): SigLIP tower, anyres
tiles with downsampling, Qwen2 decoder, and the processor files as the hub publishes them.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmlens.testing.common import _qwen2_config, _save_random_model, _siglip_config
from mmlens.testing.tokenizer import _chatml_tokenizer


def build_tiny_llava_onevision(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    max_tiles: int = 3,
    vision_aspect_ratio: str = "anyres_max_2",
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-OneVision checkpoint (``llava-onevision-qwen2-*-ov-hf``
    layout): model type ``llava_onevision``, a SigLIP tower read in full at its last layer, the
    two-layer GELU projector, `image_newline`, a Qwen2 decoder, and the processor files as the
    hub publishes them (``preprocessor_config.json`` of a ``LlavaOnevisionImageProcessor``,
    ``processor_config.json`` with ``vision_aspect_ratio``, the ChatML tokenizer with
    ``<image>`` and ``<video>``).

    The released models tile on every grid from 1 x 1 to 6 x 6 tiles of 384 px and downsample
    above nine tiles' worth of patches (``anyres_max_9``); here grids up to `max_tiles` a side of
    `image_size` px, downsampled above ``anyres_max_2``, so that small test images exercise the
    downsampling: one image gives 16 base tokens and at most 12 x 13 tile tokens.

    Examples:
        >>> folder = build_tiny_llava_onevision("checkpoints/onevision")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedLlavaOnevision'
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    path = Path(path)
    tokenizer = _chatml_tokenizer(extra=["<video>"])
    pinpoints = [
        [image_size * rows, image_size * cols]
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
    ]
    config = LlavaOnevisionConfig(
        vision_config=_siglip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_qwen2_config(
            tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, tie_word_embeddings
        ),
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=vision_aspect_ratio,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=tie_word_embeddings,
    )
    _save_random_model(LlavaOnevisionForConditionalGeneration, config, path, seed)
    tokenizer.save_pretrained(path)
    image_settings = {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
        "do_resize": True, "image_grid_pinpoints": pinpoints, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaOnevisionProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size},
    }  # fmt: skip
    processor_settings = {
        "image_token": "<image>", "num_image_tokens": (image_size // patch_size) ** 2,
        "processor_class": "LlavaOnevisionProcessor", "video_token": "<video>",
        "vision_aspect_ratio": vision_aspect_ratio, "vision_feature_select_strategy": "full",
    }  # fmt: skip
    for name, settings in [
        ("preprocessor_config.json", image_settings),
        ("processor_config.json", processor_settings),
    ]:
        (path / name).write_text(json.dumps(settings, indent=2) + "\n")
    return path
