"""Tiny random Qwen3-VL checkpoints (`build_tiny_qwen3_vl`): a ViT with learned (interpolated)
position embeddings and DeepStack mergers, a Qwen3 decoder (an RMSNorm over each head's query
and key) with interleaved M-RoPE, and the image processor's settings as the hub publishes them.
"""

from __future__ import annotations

from pathlib import Path

from mmlens.testing.common import _save_random_model
from mmlens.testing.qwen2_vl import _vision_tokenizer, _write_image_processor


def build_tiny_qwen3_vl(
    path: str | Path,
    *,
    n_layers: int = 3,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_head: int = 32,
    d_mlp: int = 128,
    mrope_section: tuple[int, int, int] = (6, 5, 5),
    vision_layers: int = 3,
    vision_d_model: int = 32,
    vision_d_mlp: int = 48,
    vision_heads: int = 4,
    patch_size: int = 8,
    num_position_embeddings: int = 36,
    deepstack_layers: tuple[int, ...] = (0, 1),
    min_pixels: int = 16 * 16 * 4,
    max_pixels: int = 16 * 16 * 24,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random ``Qwen3VLForConditionalGeneration`` checkpoint (the Qwen3-VL-*-Instruct
    layout): `vision_layers` LayerNorm / GELU blocks on patches of `patch_size` px with a learned
    grid of `num_position_embeddings` positions (a square) interpolated to each image, a 2 x 2
    merger, DeepStack mergers after the tower blocks `deepstack_layers` (added to the first
    decoder layers' outputs at the image tokens), a Qwen3 decoder with interleaved M-RoPE
    (`mrope_section`), the ChatML tokenizer with the vision markers and the image processor's
    settings (mean and std 0.5).

    Examples:
        >>> folder = build_tiny_qwen3_vl("checkpoints/qwen3-vl")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedQwen3VL'
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = Path(path)
    tokenizer, token_ids = _vision_tokenizer()
    if sum(mrope_section) != d_head // 2:
        raise ValueError(f"mrope_section {mrope_section} must sum to d_head / 2 = {d_head // 2}")
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads, head_dim=d_head,
            num_key_value_heads=n_kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                             "mrope_section": list(mrope_section), "mrope_interleaved": True},
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=vision_layers, hidden_size=vision_d_model, intermediate_size=vision_d_mlp,
            out_hidden_size=d_model, num_heads=vision_heads, patch_size=patch_size,
            spatial_merge_size=2, temporal_patch_size=2, hidden_act="gelu_pytorch_tanh",
            num_position_embeddings=num_position_embeddings,
            deepstack_visual_indexes=list(deepstack_layers),
        ),
        **token_ids,
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    _save_random_model(Qwen3VLForConditionalGeneration, config, path, seed)
    tokenizer.save_pretrained(path)
    _write_image_processor(
        path,
        patch_size,
        min_pixels,
        max_pixels,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        processor_class="Qwen3VLProcessor",
    )
    return path
