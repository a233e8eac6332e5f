"""Tiny random Gemma 3 checkpoints (`build_tiny_gemma3`): a SigLIP tower, the 4 x 4-style
average-pooling projector (`mm_soft_emb_norm`, `mm_input_projection_weight`), a Gemma 3
decoder with interleaved sliding-window and global layers, and HF's `Gemma3Processor` (the PIL
image processor, Gemma 3's chat template) saved beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from mmlens.testing.common import _save_random_model, _siglip_config
from mmlens.testing.tokenizer import make_tokenizer

GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
"""Gemma 3's image markers, as its tokenizer names them (``extra_special_tokens``)."""

GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    '{%- set first_user_prefix = "" -%}'
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma 3's chat template (the -it checkpoints'), its text and image parts: a system turn
is put before the first user text, an image item becomes ``<start_of_image>``."""


def gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """The SentencePiece-style test tokenizer with Gemma 3's turn and image markers, named as
    Gemma's tokenizer names them (``boi_token``, ``eoi_token``, ``image_token``).

    Examples:
        >>> tokenizer = gemma3_tokenizer()
        >>> tokenizer.boi_token, tokenizer.image_token
        ('<start_of_image>', '<image_soft_token>')
    """
    base = make_tokenizer()
    backend = base.backend_tokenizer
    from tokenizers import AddedToken

    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in ["<start_of_turn>", "<end_of_turn>", *GEMMA3_TOKENS.values()]
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=base.bos_token,
        eos_token=base.eos_token,
        unk_token=base.unk_token,
        pad_token=base.pad_token,
        padding_side="left",
        extra_special_tokens=dict(GEMMA3_TOKENS),
        model_max_length=4096,
    )


def build_tiny_gemma3(
    path: str | Path,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_head: int = 16,
    d_mlp: int = 128,
    sliding_window: int = 24,
    sliding_window_pattern: int = 2,
    query_pre_attn_scalar: int = 24,
    rope_scaling_factor: float | None = 8.0,
    final_logit_softcapping: float | None = None,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 32,
    patch_size: int = 4,
    mm_tokens_per_image: int = 16,
    seed: int = 0,
) -> Path:
    """Write a random ``Gemma3ForConditionalGeneration`` checkpoint (the gemma-3-*-it layout):
    a SigLIP tower (`image_size` px, `patch_size` px patches), the projector pooling its
    patch grid to `mm_tokens_per_image` tokens (a square; gemma-3 pools 64 x 64 patches by 4 x 4
    to 256), a Gemma 3 decoder of `n_layers` layers where every `sliding_window_pattern`-th one
    is global and the others see the last `sliding_window` positions (local rotary base 10^4,
    global 10^6 with linear scaling `rope_scaling_factor` as the 4B/12B/27B checkpoints), and the
    processor: HF's `Gemma3Processor` with the PIL image processor (a squash to `image_size`,
    mean and std 0.5), the test tokenizer with Gemma's markers and Gemma 3's chat template.

    The defaults give 16 image tokens per image and a window of 24 positions, smaller than a
    prompt with an image, so that the local layers' windows matter in tests.

    Examples:
        >>> folder = build_tiny_gemma3("checkpoints/gemma3")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedGemma3'
    """
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
    )
    from transformers.image_utils import PILImageResampling

    path = Path(path)
    tokenizer = gemma3_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_TOKENS.items()}
    rope: dict[str, Any] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    }
    if rope_scaling_factor is not None:
        rope["full_attention"] = {
            "rope_type": "linear",
            "rope_theta": 1_000_000.0,
            "factor": rope_scaling_factor,
        }
    layer_types = [
        "full_attention" if (i + 1) % sliding_window_pattern == 0 else "sliding_attention"
        for i in range(n_layers)
    ]
    config = Gemma3Config(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
            num_hidden_layers=n_layers, num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads, head_dim=d_head, max_position_embeddings=512,
            rms_norm_eps=1e-6, rope_parameters=rope, sliding_window=sliding_window,
            layer_types=layer_types, query_pre_attn_scalar=query_pre_attn_scalar,
            final_logit_softcapping=final_logit_softcapping,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=_siglip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ).to_dict(),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["boi_token"],
        eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"],
        tie_word_embeddings=True,
    )  # fmt: skip
    _save_random_model(Gemma3ForConditionalGeneration, config, path, seed)
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, resample=PILImageResampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_pan_and_scan=False,
    )  # fmt: skip
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )
    processor.save_pretrained(path)
    return path


def hf_gemma3_inputs(model: Any, inp: Any) -> dict[str, Any]:
    """HF's inputs for `inp` on Gemma 3: exactly mmlens' ids, mask and pixels, and the token
    types HF's processor gives (1 at image tokens), from which HF's model builds its
    bidirectional image blocks.

    Examples:
        >>> gemma = mmlens.from_pretrained(build_tiny_gemma3("checkpoints/gemma3"))
        >>> kwargs = hf_gemma3_inputs(gemma, gemma.prepare(image, "What is it?"))
        >>> int(kwargs["token_type_ids"].sum())
        16
    """
    kwargs = inp.model_kwargs()
    kwargs["token_type_ids"] = (kwargs["input_ids"] == model.cfg.image_token_id).long()
    return kwargs
