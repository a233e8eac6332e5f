"""Tiny random Qwen2.5-VL checkpoints (`build_tiny_qwen2_5_vl`): Qwen2-VL's layout with a tower
of RMSNorm and SwiGLU blocks, window attention outside `fullatt_block_indexes`, and the same
image processor.
"""

from __future__ import annotations

from pathlib import Path

from mmlens.testing.common import _save_random_model
from mmlens.testing.qwen2_vl import _qwen2_text_config, _vision_tokenizer, _write_image_processor


def build_tiny_qwen2_5_vl(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    vision_layers: int = 3,
    vision_d_model: int = 32,
    vision_d_mlp: int = 48,
    vision_heads: int = 4,
    patch_size: int = 7,
    window_size: int = 28,
    fullatt_block_indexes: tuple[int, ...] = (1,),
    min_pixels: int = 14 * 14 * 4,
    max_pixels: int = 14 * 14 * 24,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random ``Qwen2_5_VLForConditionalGeneration`` checkpoint (the
    Qwen2.5-VL-*-Instruct layout): `vision_layers` RMSNorm / SwiGLU blocks on patches of
    `patch_size` px, windows of `window_size` px (2 x 2 cells of 14 px by default, so images of
    a few cells have several windows) except in `fullatt_block_indexes`, a 2 x 2 merger into a
    Qwen2 decoder with M-RoPE (`mrope_section`), the ChatML tokenizer with the vision markers and
    Qwen2-VL's image processor settings.

    Examples:
        >>> folder = build_tiny_qwen2_5_vl("checkpoints/qwen2.5-vl")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedQwen25VL'
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    tokenizer, token_ids = _vision_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_qwen2_text_config(
            tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, mrope_section
        ),
        vision_config=dict(
            depth=vision_layers, hidden_size=vision_d_model, intermediate_size=vision_d_mlp,
            out_hidden_size=d_model, num_heads=vision_heads, patch_size=patch_size,
            spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu",
            window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes),
        ),
        **token_ids,
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    _save_random_model(Qwen2_5_VLForConditionalGeneration, config, path, seed)
    tokenizer.save_pretrained(path)
    _write_image_processor(path, patch_size, min_pixels, max_pixels)
    return path
