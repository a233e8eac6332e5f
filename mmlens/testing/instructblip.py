"""Tiny random InstructBLIP checkpoints (`build_tiny_instructblip`): BLIP-2's ViT, the Q-Former
with its BERT tokenizer, the language projection and a Vicuna-style Llama decoder.
"""

from __future__ import annotations

from pathlib import Path

from mmlens.testing.common import _CLIP_PIXELS, _decoder_config, _save_random_model
from mmlens.testing.tokenizer import make_bert_tokenizer, make_tokenizer


def build_tiny_instructblip(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    qformer_layers: int = 2,
    qformer_d_model: int = 32,
    qformer_heads: int = 4,
    num_query_tokens: int = 8,
    seed: int = 0,
) -> Path:
    """Write a random InstructBLIP checkpoint (``Salesforce/instructblip-vicuna-*`` layout as
    transformers saves it): BLIP-2's ViT (class token, fused query/key/value with query and value
    biases, post-layernorm), the Q-Former (BERT blocks, cross-attention every second block,
    `num_query_tokens` queries; the real ones have 32 over 12 blocks), the linear language
    projection and a Vicuna-style Llama decoder; the processor files with the Q-Former's BERT
    tokenizer in ``qformer_tokenizer/`` and ``<image>`` in the decoder's tokenizer.

    Examples:
        >>> folder = build_tiny_instructblip("checkpoints/instructblip")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedInstructBlip'
    """
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    path = Path(path)
    tokenizer = make_tokenizer()
    qformer_tokenizer = make_bert_tokenizer()
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=vision_d_model, intermediate_size=4 * vision_d_model,
            num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
            image_size=image_size, patch_size=patch_size,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer), hidden_size=qformer_d_model,
            num_hidden_layers=qformer_layers, num_attention_heads=qformer_heads,
            intermediate_size=4 * qformer_d_model, max_position_embeddings=128,
            pad_token_id=qformer_tokenizer.pad_token_id,
        ).to_dict(),
        text_config=_decoder_config(
            "vicuna", tokenizer, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            n_kv_heads=None, d_mlp=d_mlp, rope_theta=None,
        ).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.image_token_id,
    )  # fmt: skip
    _save_random_model(InstructBlipForConditionalGeneration, config, path, seed)
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(
            size={"height": image_size, "width": image_size}, **_CLIP_PIXELS
        ),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )
    processor.save_pretrained(path)
    return path
