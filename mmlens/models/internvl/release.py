"""The original InternVL release format (``InternVLChatModel``: InternVL2 / InternVL2.5 with
InternLM2 decoders): a remote-code checkpoint (``config.json`` with ``model_type``
``internvl_chat``, ``vision_config``, ``llm_config``, an ``auto_map`` naming its Python), the
weights under ``vision_model.*``, ``mlp1.*`` and ``language_model.*``, and for InternLM2 a
SentencePiece ``tokenizer.model`` read by ``tokenization_internlm2.py``.

mmlens reads it natively and runs none of its Python (docs/checkpoints.md, "InternVL"):

- `release_config`: ``config.json`` as the equivalent transformers `InternVLConfig` (InternViT's
  settings, the connector's, and the decoder's: InternLM2 as the Llama architecture it is);
- `internlm2_tokenizer`: ``tokenizer.model`` turned into a fast tokenizer that encodes as
  SentencePiece does, each text piece between special tokens apart with its dummy prefix
  (transformers' `SpmConverter.build_tokenizer_from_spm_proto`, legacy: what the release's
  ``InternLM2Tokenizer`` does), BOS first, the added tokens of ``tokenizer_config.json``;
- `release_tensors`: the weights under the names of the ``-hf`` layout, the fused projections
  split: InternViT's ``qkv`` (query, key, value) and InternLM2's ``wqkv``, whose rows are laid
  out per key-value group: ``[kv_head, q_per_kv + 2, d_head]`` (the group's queries, then its
  key, then its value).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import einops
import torch

from mmlens.loading import safetensors_items

DECODERS = ("InternLM2ForCausalLM",)
"""The ``llm_config`` architectures mmlens reads."""

TEMPLATES = {"internlm2-chat": "internlm2_chat", "internvl2_5": "internvl2_5"}
"""The release's conversation template (``config.json``'s ``template``) -> mmlens' name."""


def is_internvl_release(folder: Path) -> bool:
    """Whether `folder` holds an original InternVL release (``model_type`` ``internvl_chat``)."""
    path = folder / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") == "internvl_chat"
    except (OSError, ValueError, AttributeError):
        return False


def read_raw(folder: Path) -> dict[str, Any]:
    """``config.json``, checked for what mmlens implements."""
    raw = json.loads((folder / "config.json").read_text())
    llm = raw["llm_config"]
    architecture = (llm.get("architectures") or ["?"])[0]
    if architecture not in DECODERS:
        raise NotImplementedError(
            f"{folder}: an InternVL release with a {architecture} decoder; mmlens reads "
            f"{' and '.join(DECODERS)} ones (docs/checkpoints.md, 'InternVL')"
        )
    if raw.get("ps_version", "v1") not in ("v1", "v2"):
        raise NotImplementedError(
            f"{folder}: ps_version={raw.get('ps_version')!r}; mmlens reads 'v1' "
            "(InternVL-Chat-V1-5: each crop's tokens column by column) and 'v2'"
        )
    if raw.get("template") not in TEMPLATES:
        raise NotImplementedError(
            f"{folder}: conversation template {raw.get('template')!r}; mmlens knows "
            f"{sorted(TEMPLATES)}"
        )
    if not raw.get("use_thumbnail", True) and raw.get("dynamic_image_size", True):
        raise NotImplementedError(f"{folder}: tiles without a thumbnail (use_thumbnail false)")
    vision = raw["vision_config"]
    if vision.get("qk_normalization") and vision.get("layer_norm_eps", 1e-6) != 1e-6:
        raise NotImplementedError("InternViT QK-norm with layer_norm_eps other than 1e-6")
    return raw


def _llm_text_config(llm: dict[str, Any], eos_token_ids: list[int]) -> dict[str, Any]:
    """The decoder's transformers config: InternLM2 as the Llama architecture (RMSNorm, rotary
    on the whole head, SwiGLU; `bias` on every attention projection).
    InternLM2's ``dynamic`` rotary scaling changes the base only past
    ``max_position_embeddings``, where mmlens refuses to run (`HookedInternVL.position_ids`)."""
    scaling = llm.get("rope_scaling") or {}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": llm.get("rope_theta", 10000.0)}
    if scaling.get("type") == "linear":
        rope = {**rope, "rope_type": "linear", "factor": scaling["factor"]}
    elif scaling and scaling.get("type") != "dynamic":
        raise NotImplementedError(f"InternLM2 rope_scaling {scaling}: 'linear' or 'dynamic'")
    return dict(
        model_type="llama",
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_key_value_heads") or llm["num_attention_heads"],
        max_position_embeddings=llm.get("max_position_embeddings", 32768),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        rope_parameters=rope,
        attention_bias=bool(llm.get("bias", False)),
        hidden_act=llm.get("hidden_act", "silu"),
        bos_token_id=llm.get("bos_token_id", 1),
        eos_token_id=eos_token_ids,
        pad_token_id=llm.get("pad_token_id", 2),
        tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
    )


def release_config(folder: Path) -> Any:
    """The release's ``config.json`` as the equivalent transformers `InternVLConfig` (model
    type ``internvl``: it loads as `HookedInternVL`)."""
    from transformers import InternVLConfig

    raw = read_raw(folder)
    vision = raw["vision_config"]
    tokenizer = internlm2_tokenizer(folder)
    image_size = raw.get("force_image_size") or vision["image_size"]
    patches = image_size // vision["patch_size"]
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=vision["hidden_size"],
            num_hidden_layers=vision["num_hidden_layers"],
            num_attention_heads=vision["num_attention_heads"],
            intermediate_size=vision["intermediate_size"],
            image_size=image_size,
            patch_size=vision["patch_size"],
            norm_type=vision.get("norm_type", "layer_norm"),
            use_qk_norm=bool(vision.get("qk_normalization", False)),
            attention_bias=bool(vision.get("qkv_bias", True)),
            layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
            hidden_act=vision.get("hidden_act", "gelu"),
            use_mean_pooling=True,  # the release reads the encoder's output without a final norm
        ),
        # The chat stops at its turn's end (`chat()`: the template's separator) or at EOS.
        text_config=_llm_text_config(
            raw["llm_config"],
            [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=int(patches**2 * raw["downsample_ratio"] ** 2),
        downsample_ratio=raw["downsample_ratio"],
        projector_hidden_act="gelu",
        vision_feature_layer=raw.get("select_layer", -1),
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(raw["llm_config"].get("tie_word_embeddings", False)),
    )
    config.name_or_path = str(folder)
    config.mmlens_release = {
        "template": TEMPLATES[raw["template"]],
        "column_major_tokens": _column_major(raw),
    }
    # InternLM2's dynamic rotary scaling: another base past this length (refused there)
    config.mmlens_rotary_limit = (
        config.text_config.max_position_embeddings
        if (raw["llm_config"].get("rope_scaling") or {}).get("type") == "dynamic"
        else None
    )
    return config


def release_processor(folder: Path) -> Any:
    """The release's image preprocessing (``dynamic_preprocess`` and its transform: tiles of
    ``force_image_size`` px between ``min_dynamic_patch`` and ``max_dynamic_patch``, the
    thumbnail, bicubic, ImageNet's mean and deviation) and tokenizer, as an
    `InternVLInputProcessor`."""
    from transformers import GotOcr2ImageProcessorPil
    from transformers.image_utils import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        PILImageResampling,
    )

    from mmlens.models.internvl.processor import InternVLInputProcessor

    raw = read_raw(folder)
    side = raw.get("force_image_size") or raw["vision_config"]["image_size"]
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": side, "width": side},
        resample=PILImageResampling.BICUBIC,
        min_patches=raw.get("min_dynamic_patch", 1),
        max_patches=raw.get("max_dynamic_patch", 12),
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    patches = side // raw["vision_config"]["patch_size"]
    return InternVLInputProcessor(
        image_processor,
        internlm2_tokenizer(folder),
        image_seq_length=int(patches**2 * raw["downsample_ratio"] ** 2),
        crop_to_patches=bool(raw.get("dynamic_image_size", True)),
        column_major=_column_major(raw),
    )


def _column_major(raw: dict[str, Any]) -> bool:
    """Whether the release's pixel shuffle lists each crop's tokens column by column: its
    ``ps_version`` ``v1`` (the release code's default), which skips v2's last transpose."""
    return raw.get("ps_version", "v1") == "v1"


def internlm2_tokenizer(folder: Path) -> Any:
    """InternLM2's tokenizer from ``tokenizer.model`` and ``tokenizer_config.json`` without its
    remote code: SentencePiece's encoding of each text piece between added tokens (dummy prefix
    on each piece, byte fallback, user-defined pieces whole), ``<s>`` first, the added tokens
    (``<|im_start|>``, ``<img>``, ``<IMG_CONTEXT>``, ...) at their ids, left padding.

    Raises:
        FileNotFoundError: no ``tokenizer.model``.
    """
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    path = folder / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer.model: an InternLM2 release ships its SentencePiece "
            "vocabulary there"
        )
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    settings_path = folder / "tokenizer_config.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    added = sorted(
        (int(index), entry) for index, entry in settings.get("added_tokens_decoder", {}).items()
    )
    for index, entry in added:
        if index >= len(vocab):
            if backend.get_vocab_size() != index:
                raise ValueError(
                    f"{settings_path}: added token {entry['content']!r} at id {index}, but the "
                    f"vocabulary ends at {backend.get_vocab_size()}"
                )
        backend.add_special_tokens(
            [AddedToken(entry["content"], special=entry.get("special", True), normalized=False)]
        )
    bos = settings.get("bos_token", "<s>")
    bos = bos["content"] if isinstance(bos, dict) else bos
    if settings.get("add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )

    def token(name: str, default: str) -> str:
        value = settings.get(name, default)
        return value["content"] if isinstance(value, dict) else value

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=token("eos_token", "</s>"),
        unk_token=token("unk_token", "<unk>"),
        pad_token=token("pad_token", "</s>"),
        padding_side="left",
        model_max_length=1 << 30,
    )


_VISION = [
    ("embeddings.class_embedding", "embeddings.cls_token"),
    ("embeddings.position_embedding", "embeddings.position_embeddings"),
    ("embeddings.patch_embedding.", "embeddings.patch_embeddings.projection."),
    (".attn.proj.", ".attention.projection_layer."),
    (".attn.q_norm.", ".attention.q_norm."),
    (".attn.k_norm.", ".attention.k_norm."),
    (".ls1", ".lambda_1"),
    (".ls2", ".lambda_2"),
    (".norm1.", ".layernorm_before."),
    (".norm2.", ".layernorm_after."),
    ("encoder.layers.", "encoder.layer."),
]
_INTERNLM2 = [
    ("model.tok_embeddings.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
    ("output.", "lm_head."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    ("model.layers.", "model.language_model.layers."),
]
_PROJECTOR = {"mlp1.0.": "layer_norm.", "mlp1.1.": "linear_1.", "mlp1.3.": "linear_2."}


def release_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The release's tensors under the ``-hf`` layout's names (`HookedInternVL`'s rules rename
    them from there), fused projections split (module docstring)."""
    llm = read_raw(folder)["llm_config"]
    n_heads, d_model = llm["num_attention_heads"], llm["hidden_size"]
    n_kv = llm.get("num_key_value_heads") or n_heads
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(
            f"{folder} has no .safetensors weights: re-save the release's .bin weights as "
            "safetensors (mmlens reads the release's safetensors)"
        )
    for name, tensor in safetensors_items(shards):
        if name.startswith("vision_model."):
            yield from _vision_tensor(name.removeprefix("vision_model."), tensor)
        elif name.startswith("mlp1."):
            prefix = name[: len("mlp1.0.")]
            yield f"model.multi_modal_projector.{_PROJECTOR[prefix]}{name[len(prefix) :]}", tensor
        elif name.startswith("language_model."):
            yield from _internlm2_tensor(
                name.removeprefix("language_model."), tensor, n_kv, d_model // n_heads
            )
        else:
            raise ValueError(f"{folder}: unexpected tensor {name!r} in an InternVL release")


def _vision_tensor(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for old, new in _VISION:
        name = name.replace(old, new)
    prefix = "model.vision_tower."
    if ".attn.qkv." in name:  # [(q, k, v) x d_vision, ...]: the three projections in turn
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
            yield prefix + name.replace(".attn.qkv.", f".attention.{part}."), chunk
        return
    yield prefix + name, tensor


def _internlm2_tensor(
    name: str, tensor: torch.Tensor, n_kv: int, d_head: int
) -> Iterator[tuple[str, torch.Tensor]]:
    for old, new in _INTERNLM2:
        name = name.replace(old, new)
    if ".attention.wqkv." in name:
        # Rows per key-value group: its q_per_kv query heads, its key, its value.
        grouped = einops.rearrange(tensor, "(kv slot d) ... -> kv slot d ...", kv=n_kv, d=d_head)
        parts = {
            "q_proj": grouped[:, :-2].flatten(0, 2),
            "k_proj": grouped[:, -2].flatten(0, 1),
            "v_proj": grouped[:, -1].flatten(0, 1),
        }
        for part, value in parts.items():
            yield name.replace(".attention.wqkv.", f".self_attn.{part}."), value
        return
    yield name, tensor
