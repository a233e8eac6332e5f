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


RELEASE_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>"]
"""InternLM2's chat markers: pieces of its SentencePiece model (user-defined symbols)."""
RELEASE_ADDED_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>",
                        "</ref>", "<box>", "</box>"]  # fmt: skip
"""The tokens InternVL's releases add after InternLM2's vocabulary, in id order."""

NEVER_RUN = "raise RuntimeError('the checkpoint folder's Python code ran')\n"
"""What the builder writes into the release's remote-code files: importing them fails."""


def build_tiny_internvl_release(
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
    norm_type: str = "rms_norm",
    qk_normalization: bool = True,
    vocab_size: int = 800,
    template: str = "internlm2-chat",
    ps_version: str = "v2",
    seed: int = 0,
) -> Path:
    """Write a random checkpoint in the layout of an original InternVL2 release with an
    InternLM2 decoder (``OpenGVLab/InternVL2-8B``'s files at a small size): ``config.json``
    (``model_type`` ``internvl_chat``, ``vision_config``, ``llm_config`` of an
    ``InternLM2ForCausalLM`` with dynamic rotary scaling, ``auto_map``), the weights under the
    release's names (InternViT's fused ``qkv``, ``ls1`` / ``ls2``; ``mlp1``; InternLM2's
    grouped ``wqkv``, ``wo``, ``feed_forward.w1/w2/w3``, ``attention_norm``, ``ffn_norm``,
    ``tok_embeddings``, ``output``), a SentencePiece BPE ``tokenizer.model``
    (`_sentencepiece_model`: byte fallback, dummy prefix, ``<|im_start|>`` / ``<|im_end|>`` as
    user-defined pieces) with
    ``tokenizer_config.json`` adding InternVL's image tags after it, and remote-code files that
    fail if anything imports them.

    Examples:
        >>> folder = build_tiny_internvl_release("checkpoints/internvl2")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedInternVL'
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_proto = _sentencepiece_model(vocab_size)
    (path / "tokenizer.model").write_bytes(model_proto.SerializeToString())
    n_pieces = len(model_proto.pieces)
    ids = {piece.piece: index for index, piece in enumerate(model_proto.pieces)}
    added = {
        **{str(ids[token]): token for token in RELEASE_SPECIAL_TOKENS},
        **{str(n_pieces + index): token for index, token in enumerate(RELEASE_ADDED_TOKENS)},
    }
    tokenizer_settings = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "pad_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": {
            index: {"content": token, "special": True, "lstrip": False, "rstrip": False,
                    "normalized": False, "single_word": False}
            for index, token in added.items()
        },
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_settings, indent=2) + "\n")
    vocab = n_pieces + len(RELEASE_ADDED_TOKENS)
    vision = dict(
        architectures=["InternVisionModel"], hidden_size=vision_d_model,
        intermediate_size=2 * vision_d_model, num_attention_heads=vision_heads,
        num_hidden_layers=vision_layers, image_size=image_size, patch_size=patch_size,
        qkv_bias=True, qk_normalization=qk_normalization, norm_type=norm_type,
        layer_norm_eps=1e-6, hidden_act="gelu", num_channels=3,
    )  # fmt: skip
    llm = dict(
        architectures=["InternLM2ForCausalLM"], vocab_size=vocab, hidden_size=d_model,
        intermediate_size=d_mlp, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False,
        hidden_act="silu", bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=False,
    )  # fmt: skip
    config = dict(
        architectures=["InternVLChatModel"], model_type="internvl_chat",
        auto_map={"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                  "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        downsample_ratio=0.5, dynamic_image_size=True, force_image_size=image_size,
        max_dynamic_patch=12, min_dynamic_patch=1, ps_version=ps_version, select_layer=-1,
        template=template, use_thumbnail=True, vision_config=vision, llm_config=llm,
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("configuration_internvl_chat.py", "modeling_internvl_chat.py",
                 "tokenization_internlm2.py", "modeling_internlm2.py"):  # fmt: skip
        (path / name).write_text(NEVER_RUN)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        _release_weights(vision, llm, generator), str(path / "model.safetensors"),
        metadata={"format": "pt"},
    )  # fmt: skip
    return path


def _sentencepiece_model(vocab_size: int) -> Any:
    """A SentencePiece BPE model (``tokenizer.model``'s protobuf, written with the schema
    transformers ships): a BPE trained in-process by `tokenizers` on the test corpus, its pieces
    in training order with score minus their id (SentencePiece merges the highest-scoring
    piece first), ``<unk>`` / ``<s>`` / ``</s>``, the 256 byte-fallback pieces, InternLM2's
    chat markers as user-defined pieces; identity normalisation with a dummy prefix, as a
    Llama-style SentencePiece model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import import_protobuf

    from mmlens.testing.tokenizer import tokenizer_corpus

    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trained.train_from_iterator(
        tokenizer_corpus("vicuna"),
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False),
    )
    learned = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    pb2 = import_protobuf()
    proto = pb2.ModelProto()
    kind = pb2.ModelProto.SentencePiece.Type
    entries = [("<unk>", kind.UNKNOWN), ("<s>", kind.CONTROL), ("</s>", kind.CONTROL)]
    entries += [(f"<0x{byte:02X}>", kind.BYTE) for byte in range(256)]
    entries += [(piece, kind.NORMAL) for piece, _ in learned if piece != "<unk>"]
    entries += [(token, kind.USER_DEFINED) for token in RELEASE_SPECIAL_TOKENS]
    for index, (text, piece_type) in enumerate(entries):
        piece = proto.pieces.add()
        piece.piece, piece.type = text, piece_type
        piece.score = -float(index) if piece_type == kind.NORMAL else 0.0
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    trainer.model_type = pb2.TrainerSpec.BPE
    trainer.vocab_size = len(entries)
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = "<unk>", "<s>", "</s>"
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto


def _release_weights(vision: dict[str, Any], llm: dict[str, Any], generator: Any) -> dict[str, Any]:
    """Random tensors under the release's names and shapes (norms near 1, layer scales near
    0.5, biases small, weights of std 0.15)."""
    import torch

    def draw(*shape: int, mean: float = 0.0, std: float = 0.15) -> torch.Tensor:
        return (mean + std * torch.randn(*shape, generator=generator)).contiguous()

    dv, d = vision["hidden_size"], llm["hidden_size"]
    n_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    tensors = {
        "vision_model.embeddings.class_embedding": draw(1, 1, dv),
        "vision_model.embeddings.patch_embedding.weight": draw(
            dv, 3, vision["patch_size"], vision["patch_size"]
        ),
        "vision_model.embeddings.patch_embedding.bias": draw(dv, std=0.05),
        "vision_model.embeddings.position_embedding": draw(1, n_patches + 1, dv),
    }
    layer_norm = vision["norm_type"] == "layer_norm"
    for layer in range(vision["num_hidden_layers"]):
        prefix = f"vision_model.encoder.layers.{layer}."
        for norm in ("norm1", "norm2"):
            tensors[f"{prefix}{norm}.weight"] = draw(dv, mean=1.0, std=0.2)
            if layer_norm:
                tensors[f"{prefix}{norm}.bias"] = draw(dv, std=0.1)
        tensors[f"{prefix}attn.qkv.weight"] = draw(3 * dv, dv)
        tensors[f"{prefix}attn.qkv.bias"] = draw(3 * dv, std=0.05)
        if vision["qk_normalization"]:
            tensors[f"{prefix}attn.q_norm.weight"] = draw(dv, mean=1.0, std=0.2)
            tensors[f"{prefix}attn.k_norm.weight"] = draw(dv, mean=1.0, std=0.2)
        tensors[f"{prefix}attn.proj.weight"] = draw(dv, dv)
        tensors[f"{prefix}attn.proj.bias"] = draw(dv, std=0.05)
        tensors[f"{prefix}ls1"] = draw(dv, mean=0.5, std=0.2)
        tensors[f"{prefix}ls2"] = draw(dv, mean=0.5, std=0.2)
        tensors[f"{prefix}mlp.fc1.weight"] = draw(vision["intermediate_size"], dv)
        tensors[f"{prefix}mlp.fc1.bias"] = draw(vision["intermediate_size"], std=0.05)
        tensors[f"{prefix}mlp.fc2.weight"] = draw(dv, vision["intermediate_size"])
        tensors[f"{prefix}mlp.fc2.bias"] = draw(dv, std=0.05)
    tensors.update({
        "mlp1.0.weight": draw(4 * dv, mean=1.0, std=0.2), "mlp1.0.bias": draw(4 * dv, std=0.1),
        "mlp1.1.weight": draw(d, 4 * dv), "mlp1.1.bias": draw(d, std=0.05),
        "mlp1.3.weight": draw(d, d), "mlp1.3.bias": draw(d, std=0.05),
    })  # fmt: skip
    n_heads, n_kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    d_head, d_mlp = d // n_heads, llm["intermediate_size"]
    tensors["language_model.model.tok_embeddings.weight"] = draw(llm["vocab_size"], d)
    for layer in range(llm["num_hidden_layers"]):
        prefix = f"language_model.model.layers.{layer}."
        tensors[f"{prefix}attention.wqkv.weight"] = draw((n_heads + 2 * n_kv) * d_head, d)
        tensors[f"{prefix}attention.wo.weight"] = draw(d, n_heads * d_head)
        tensors[f"{prefix}feed_forward.w1.weight"] = draw(d_mlp, d)
        tensors[f"{prefix}feed_forward.w3.weight"] = draw(d_mlp, d)
        tensors[f"{prefix}feed_forward.w2.weight"] = draw(d, d_mlp)
        tensors[f"{prefix}attention_norm.weight"] = draw(d, mean=1.0, std=0.2)
        tensors[f"{prefix}ffn_norm.weight"] = draw(d, mean=1.0, std=0.2)
    tensors["language_model.model.norm.weight"] = draw(d, mean=1.0, std=0.2)
    tensors["language_model.output.weight"] = draw(llm["vocab_size"], d)
    return tensors
