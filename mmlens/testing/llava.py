"""Tiny random checkpoints of model type ``llava``: LLaVA-1.5 (`build_tiny_llava`: CLIP ViT,
two-layer projector, Vicuna-style Llama decoder) with llava-1.5's image processor
(`make_image_processor`, also the tiny-shapes organisms' processor), and LLaVA-Interleave
(`build_tiny_llava_interleave`: SigLIP tower, Qwen2 decoder, ChatML tokenizer).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)
from transformers.image_utils import PILImageResampling

from mmlens.testing.common import (
    _CLIP_PIXELS,
    _clip_config,
    _decoder_config,
    _qwen2_config,
    _save_random_model,
    _siglip_config,
)
from mmlens.testing.tokenizer import _chatml_tokenizer, make_tokenizer


def make_image_processor(
    image_size: int = 56, *, pad_to_square: bool = True
) -> LlavaImageProcessorPil:
    """A llava-1.5 image processor (PIL backend) for `image_size` x `image_size` vision input.

    Pads to a square with the mean colour (image centred), resizes the shorter side to
    `image_size` (bicubic), centre-crops `image_size` x `image_size`, rescales to [0, 1] and
    normalises with the CLIP mean and std. ``pad_to_square=False`` gives the plain CLIP
    preprocessing (no padding, so the crop cuts off the ends of the longer side).

    Examples:
        >>> import PIL.Image
        >>> pixels = make_image_processor(56)(PIL.Image.new("RGB", (90, 50)), return_tensors="pt")
        >>> pixels["pixel_values"].shape
        torch.Size([1, 3, 56, 56])
    """
    return LlavaImageProcessorPil(
        do_pad=pad_to_square,
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        **_CLIP_PIXELS,
    )


def build_tiny_llava(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int = 128,
    vision_layers: int = 3,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-1.5 checkpoint (safetensors + processor) to `path`.

    Architecture as llava-1.5: CLIP ViT (quick-GELU, pre-LayerNorm) -> features of
    `vision_feature_layer` (an int, or a list of ints whose features are concatenated) ->
    two-layer projector -> Llama decoder (RMSNorm, rotary, SiLU gated MLP, untied unembedding).
    ``(image_size // patch_size) ** 2`` image tokens per image, plus the CLS token when
    `vision_feature_select_strategy` is ``"full"``.

    `projector_hidden_act` is any name of `transformers.activations.ACT2FN` (``"gelu"`` as in
    llava-1.5). HF's `LlavaMultiModalProjector` always has two linear layers; ``"linear"`` maps to
    the identity activation, which is how HF expresses a linear projector (their product).

    Weights: `torch.manual_seed(seed)`, then every Linear/Conv/Embedding weight (and CLIP's class
    embedding) ~ N(0, 0.15²), biases ~ N(0, 0.05²), norm weights ~ 1 + N(0, 0.2²) and norm biases
    ~ N(0, 0.1²), so that parity tests would notice a missing bias, a swapped norm or a wrong
    scale: the logits of a forward differ strongly between positions and are far from uniform.

    Args:
        path: folder to write (created if missing).
        n_layers, d_model, n_heads, n_kv_heads, d_mlp: decoder shape (`n_kv_heads` < `n_heads`
            for grouped-query attention; default `n_heads`).
        vision_layers, vision_d_model, vision_heads, image_size, patch_size: CLIP tower shape.
        vision_feature_layer, vision_feature_select_strategy, projector_hidden_act: as in
            `transformers.LlavaConfig`.
        rope_theta: rotary base.
        seed: weight seed (the tokenizer does not depend on it).

    Returns:
        `path` as a `Path`.

    Examples:
        >>> folder = build_tiny_llava("checkpoints/llava", n_kv_heads=2)
        >>> LlavaForConditionalGeneration.from_pretrained(folder).config.text_config.num_key_value_heads
        2
    """
    path = Path(path)
    tokenizer = make_tokenizer()
    n_image_tokens = (image_size // patch_size) ** 2 + (vision_feature_select_strategy == "full")
    config = LlavaConfig(
        vision_config=_clip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_decoder_config(
            "vicuna",
            tokenizer,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_mlp=d_mlp,
            rope_theta=rope_theta,
        ),
        image_token_id=tokenizer.image_token_id,
        image_seq_length=n_image_tokens,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
    )
    _save_random_model(LlavaForConditionalGeneration, config, path, seed)
    processor = LlavaProcessor(
        image_processor=make_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


def build_tiny_llava_interleave(
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
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-Interleave checkpoint (``llava-interleave-qwen-*-hf``):
    model type ``llava`` with a SigLIP tower (no class token; every token, last layer,
    ``vision_feature_select_strategy="full"``), the two-layer GELU projector and a Qwen2 decoder
    (biases on the query, key and value projections, grouped-query attention, rotary base 10^6,
    tied embeddings as in the 0.5B model). The tokenizer is the SentencePiece-style one with
    ChatML's ``<|im_start|>`` and ``<|im_end|>`` (the conversation the checkpoints use); the
    image processor squashes to ``image_size`` with SigLIP's 0.5 mean and std.

    Examples:
        >>> folder = build_tiny_llava_interleave("checkpoints/interleave")
        >>> type(mmlens.from_pretrained(folder)).__name__, mmlens.from_pretrained(folder).cfg.qkv_bias
        ('HookedLlava', True)
    """
    from transformers import SiglipImageProcessor

    path = Path(path)
    tokenizer = _chatml_tokenizer()
    config = LlavaConfig(
        vision_config=_siglip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_qwen2_config(
            tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, tie_word_embeddings
        ),
        image_token_id=tokenizer.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=tie_word_embeddings,
    )
    _save_random_model(LlavaForConditionalGeneration, config, path, seed)
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    )
    processor.save_pretrained(path)
    return path
