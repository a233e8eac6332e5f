"""Tiny random Qwen2-VL checkpoints (`build_tiny_qwen2_vl`): the ViT with 2-D rotary and a
2 x 2 patch merger, a Qwen2 decoder with multimodal rotary (M-RoPE), and the image processor's
settings as the hub publishes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmlens.testing.common import _save_random_model
from mmlens.testing.tokenizer import _chatml_tokenizer

QWEN2_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
"""The vision markers of Qwen2-VL's vocabulary, added to the test tokenizer."""


def build_tiny_qwen2_vl(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    mrope_section: tuple[int, int, int] = (2, 3, 3),
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    patch_size: int = 7,
    min_pixels: int = 14 * 14 * 4,
    max_pixels: int = 14 * 14 * 24,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random ``Qwen2VLForConditionalGeneration`` checkpoint (the Qwen2-VL-*-Instruct
    layout): model type ``qwen2_vl``, a vision tower of `vision_layers` blocks on patches of
    `patch_size` px (two frames deep, the image repeated) merged 2 x 2 into the decoder's width,
    a Qwen2 decoder whose rotary frequencies are split into `mrope_section` (time, height,
    width), the ChatML tokenizer with the vision markers, and ``preprocessor_config.json`` of a
    ``Qwen2VLImageProcessor`` resizing each image to between `min_pixels` and `max_pixels`
    (multiples of 14 px a side).

    Examples:
        >>> folder = build_tiny_qwen2_vl("checkpoints/qwen2-vl")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedQwen2VL'
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path)
    tokenizer, token_ids = _vision_tokenizer()
    config = Qwen2VLConfig(
        text_config=_qwen2_text_config(
            tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, mrope_section
        ),
        vision_config=dict(
            depth=vision_layers, embed_dim=vision_d_model, hidden_size=d_model,
            num_heads=vision_heads, mlp_ratio=2, patch_size=patch_size, spatial_merge_size=2,
            temporal_patch_size=2, hidden_act="quick_gelu",
        ),
        **token_ids,
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    _save_random_model(Qwen2VLForConditionalGeneration, config, path, seed)
    tokenizer.save_pretrained(path)
    _write_image_processor(path, patch_size, min_pixels, max_pixels)
    return path


def hf_qwen_vl_inputs(model: Any, inp: Any) -> dict[str, Any]:
    """HF's inputs for `inp` on a Qwen-VL family: exactly mmlens' ids, mask, pixels and grids,
    and the token types HF's processor would give (1 at image tokens; HF's rope index finds the
    image tokens by them).

    Examples:
        >>> qwen = mmlens.from_pretrained(build_tiny_qwen2_vl("checkpoints/qwen2-vl"))
        >>> kwargs = hf_qwen_vl_inputs(qwen, qwen.prepare(image, "What is it?"))
        >>> int(kwargs["mm_token_type_ids"].sum()) == len(qwen.prepare(image, "What is it?").positions("image"))
        True
    """
    kwargs = inp.model_kwargs()
    kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == model.cfg.image_token_id).int()
    return kwargs


def _vision_tokenizer() -> tuple[Any, dict[str, int]]:
    """The ChatML test tokenizer with the vision markers, and the config's token-id fields."""
    tokenizer = _chatml_tokenizer(extra=QWEN2_VL_TOKENS)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}
    return tokenizer, dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def _qwen2_text_config(
    tokenizer: Any,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_mlp: int,
    mrope_section: tuple[int, int, int],
) -> dict[str, Any]:
    """The Qwen2 decoder config of Qwen2-VL and Qwen2.5-VL, rotary split into `mrope_section`."""
    d_head = d_model // n_heads
    if sum(mrope_section) != d_head // 2:
        raise ValueError(f"mrope_section {mrope_section} must sum to d_head / 2 = {d_head // 2}")
    return dict(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
        num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": list(mrope_section)},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_sliding_window=False,
    )  # fmt: skip


CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
"""Qwen2-VL's and Qwen2.5-VL's pixel normalisation (OpenAI CLIP's)."""


def _write_image_processor(
    path: Path,
    patch_size: int,
    min_pixels: int,
    max_pixels: int,
    *,
    mean: list[float] = CLIP_MEAN,
    std: list[float] = CLIP_STD,
    processor_class: str = "Qwen2VLProcessor",
) -> None:
    """``preprocessor_config.json`` of a ``Qwen2VLImageProcessor`` (the Qwen-VL families'),
    as the hub publishes it."""
    image_settings = {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": mean, "image_processor_type": "Qwen2VLImageProcessor",
        "image_std": std, "merge_size": 2,
        "patch_size": patch_size, "processor_class": processor_class, "resample": 3,
        "rescale_factor": 1 / 255, "temporal_patch_size": 2,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }  # fmt: skip
    (path / "preprocessor_config.json").write_text(json.dumps(image_settings, indent=2) + "\n")
