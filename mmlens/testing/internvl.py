"""Tiny random InternVL checkpoints (`build_tiny_internvl`): transformers' native ``internvl``
layout of the ``-hf`` releases (InternVL3 / InternVL3.5): InternViT, the pixel-shuffle MLP
connector, a Qwen2 decoder, ``GotOcr2ImageProcessor`` settings as the hub publishes them, the
tokenizer's image tags and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmlens.testing.common import _decoder_config, _qwen2_config, _save_random_model
from mmlens.testing.tokenizer import _chatml_tokenizer

INTERNVL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
"""The image tags of InternVL's vocabulary (the tokenizer's ``extra_special_tokens``)."""

INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\\n' }}{% endif %}"
)
"""The chat template of the InternVL3 ``-hf`` releases (ChatML; an image is
``<IMG_CONTEXT>\\n`` where the message places it)."""

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_tiny_internvl(
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
    image_size: int = 56,
    patch_size: int = 7,
    norm_type: str = "layer_norm",
    use_qk_norm: bool = True,
    use_mean_pooling: bool = False,
    max_patches: int = 12,
    decoder: str = "qwen2",
    tie_word_embeddings: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random ``InternVLForConditionalGeneration`` checkpoint: model type ``internvl``,
    InternViT of `vision_layers` blocks on crops of `image_size` px in patches of `patch_size`
    (layer scale; `norm_type`, QK-norm and the final layernorm as asked), pixel shuffle 0.5 and
    the MLP connector into a `decoder` (``"qwen2"``: InternVL3's; ``"qwen3"``: InternVL3.5's;
    ``"llama"``), the ChatML tokenizer with InternVL's image tags and
    chat template, ``preprocessor_config.json`` of a ``GotOcr2ImageProcessor`` (tiles of
    `image_size` px, 1 to `max_patches` of them) and ``processor_config.json``'s
    ``image_seq_length`` ((image_size / patch_size / 2) ** 2 tokens per crop).

    Examples:
        >>> folder = build_tiny_internvl("checkpoints/internvl")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedInternVL'
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    path = Path(path)
    tokenizer = _chatml_tokenizer(extra=list(INTERNVL_TOKENS.values()))
    tokenizer._set_model_specific_special_tokens(special_tokens=dict(INTERNVL_TOKENS))
    tokenizer.chat_template = INTERNVL_CHAT_TEMPLATE
    text = _text_config(
        decoder, tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, tie_word_embeddings
    )
    config = InternVLConfig(
        text_config=text.to_dict(),
        vision_config=dict(
            hidden_size=vision_d_model, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, intermediate_size=2 * vision_d_model,
            image_size=image_size, patch_size=patch_size, norm_type=norm_type,
            use_qk_norm=use_qk_norm, use_mean_pooling=use_mean_pooling, attention_bias=True,
            layer_scale_init_value=0.1, hidden_act="gelu", layer_norm_eps=1e-6,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_TOKENS["context_image_token"]),
        image_seq_length=(image_size // patch_size // 2) ** 2,
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie_word_embeddings,
    )  # fmt: skip
    _save_random_model(InternVLForConditionalGeneration, config, path, seed)
    tokenizer.save_pretrained(path)
    _write_processor_settings(path, image_size, max_patches, config.image_seq_length)
    return path


def _text_config(
    decoder: str,
    tokenizer: Any,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_mlp: int,
    tie_word_embeddings: bool,
) -> Any:
    """The decoder config: Qwen2 (InternVL3), Qwen3 (InternVL3.5, QK-norm) or Llama."""
    if decoder == "qwen2":
        return _qwen2_config(
            tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, tie_word_embeddings
        )
    if decoder == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads, head_dim=d_model // n_heads,
            max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
    if decoder == "llama":
        return _decoder_config(
            "vicuna", tokenizer, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            n_kv_heads=n_kv_heads, d_mlp=d_mlp, rope_theta=None,
        )  # fmt: skip
    raise ValueError(f"decoder={decoder!r}: 'qwen2', 'qwen3' or 'llama'")


def _write_processor_settings(
    path: Path, image_size: int, max_patches: int, image_seq_length: int
) -> None:
    """``preprocessor_config.json`` and ``processor_config.json`` as the -hf releases ship them
    (``crop_to_patches`` is off in the image processor's settings; `InternVLProcessor` turns it
    on for every call)."""
    image_settings: dict[str, Any] = {
        "crop_to_patches": False, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "image_mean": IMAGENET_MEAN,
        "image_processor_type": "GotOcr2ImageProcessor", "image_std": IMAGENET_STD,
        "max_patches": max_patches, "min_patches": 1, "processor_class": "InternVLProcessor",
        "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": image_size, "width": image_size},
    }  # fmt: skip
    (path / "preprocessor_config.json").write_text(json.dumps(image_settings, indent=2) + "\n")
    settings = {"image_seq_length": image_seq_length, "processor_class": "InternVLProcessor"}
    (path / "processor_config.json").write_text(json.dumps(settings, indent=2) + "\n")
