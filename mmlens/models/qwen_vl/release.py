"""The original Qwen-VL / Qwen-VL-Chat release format (``Qwen/Qwen-VL``, ``Qwen/Qwen-VL-Chat``):
a remote-code checkpoint (``model_type: qwen`` with a ``visual`` section in ``config.json``,
``auto_map`` naming its ``modeling_qwen.py``), the weights under ``transformer.*`` and
``lm_head.*``, and a tiktoken vocabulary (``qwen.tiktoken``).

mmlens reads it natively and runs none of its Python (docs/checkpoints.md, "Qwen-VL"):

- `QwenVLReleaseConfig`: the settings of ``config.json`` and ``generation_config.json`` (the
  chat format: ``chatml`` for Qwen-VL-Chat, ``raw`` for Qwen-VL);
- `qwen_tokenizer`: ``qwen.tiktoken`` read with the ``tiktoken`` package and turned into a
  Hugging Face fast tokenizer (`transformers`' `TikTokenConverter`) with Qwen's split pattern,
  NFC normalisation and its special tokens after the vocabulary, as the release's
  ``QWenTokenizer`` numbers them;
- `release_tensors`: the weights (safetensors, or ``pytorch_model*.bin`` with
  ``torch.load(weights_only=True)``) under mmlens names, the fused projections split: the
  decoder's ``c_attn`` into query, key and value, the vision blocks' ``in_proj`` (laid out head
  by head, query-key-value within each head) likewise, and the resampler's
  ``nn.MultiheadAttention`` ``in_proj_weight``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch

from mmlens.loading import safetensors_items

QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
"""The pre-tokenisation pattern of Qwen's tiktoken encoding (single digits, unlike cl100k)."""

IMAGE_TAGS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>",
              "<imgpad>")  # fmt: skip
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    *(f"<|extra_{index}|>" for index in range(205)),
    *IMAGE_TAGS,
)
"""Qwen-VL's special tokens in id order, numbered from the end of the BPE vocabulary."""

IMAGE_SPAN = 256
"""Tokens between ``<img>`` and ``</img>``: the image path's bytes padded with ``<imgpad>`` in
the release's tokenizer; the resampler's 256 query features replace them all."""


def is_qwen_vl(folder: Path) -> bool:
    """Whether `folder` holds an original Qwen-VL release (``model_type: qwen`` with a
    ``visual`` section)."""
    config = folder / "config.json"
    if not config.is_file():
        return False
    raw = json.loads(config.read_text())
    return raw.get("model_type") == "qwen" and isinstance(raw.get("visual"), dict)


@dataclass(frozen=True)
class QwenVLReleaseConfig:
    """What the release's ``config.json`` (`raw`) and ``generation_config.json`` say; its
    `model_type` (``qwen_vl``) picks `mmlens.models.qwen_vl.HookedQwenVL`.

    Examples:
        >>> release = QwenVLReleaseConfig.read(qwen_vl_folder)
        >>> release.model_type, release.chat_format, release.raw["visual"]["image_size"]
        ('qwen_vl', 'chatml', 84)
    """

    raw: dict[str, Any]
    chat_format: str
    name_or_path: str
    model_type: str = "qwen_vl"

    @classmethod
    def read(cls, folder: Path) -> QwenVLReleaseConfig:
        """Read `folder`'s ``config.json`` and the chat format of its
        ``generation_config.json`` (``chatml`` where the file is missing, as the chat release
        is the one studied)."""
        raw = json.loads((folder / "config.json").read_text())
        generation = folder / "generation_config.json"
        settings = json.loads(generation.read_text()) if generation.is_file() else {}
        chat_format = settings.get("chat_format", "chatml")
        if chat_format not in ("chatml", "raw"):
            raise NotImplementedError(
                f"{generation}: chat_format {chat_format!r} is not supported (chatml, raw)"
            )
        if raw.get("rotary_pct", 1.0) != 1.0:
            raise NotImplementedError(
                f"{folder}/config.json: rotary_pct {raw['rotary_pct']} is not supported (1.0, "
                "as every Qwen-VL release)"
            )
        return cls(raw, chat_format, str(folder))


def qwen_tokenizer(folder: Path) -> Any:
    """The release's tokenizer as a Hugging Face fast tokenizer: ``qwen.tiktoken``'s ranks as
    byte-level BPE (ranks are ids; a piece that is a whole vocabulary entry is not split, as in
    tiktoken), `QWEN_SPLIT_PATTERN`, NFC normalisation, and `SPECIAL_TOKENS` from id
    ``len(ranks)`` on. Left padding with ``<|endoftext|>``, as the release pads.

    Examples:
        >>> tokenizer = qwen_tokenizer(qwen_vl_folder)
        >>> tokenizer.convert_tokens_to_ids("<img>") - tokenizer.convert_tokens_to_ids("<|endoftext|>")
        214
    """
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocabulary = folder / "qwen.tiktoken"
    if not vocabulary.is_file():
        raise FileNotFoundError(
            f"{folder} has no qwen.tiktoken: the Qwen-VL release ships its vocabulary there"
        )
    backend = TikTokenConverter(vocab_file=str(vocabulary), pattern=QWEN_SPLIT_PATTERN).converted()
    n_ranks = backend.get_vocab_size()
    backend.normalizer = normalizers.NFC()
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    if backend.token_to_id(SPECIAL_TOKENS[0]) != n_ranks:
        raise ValueError(f"{vocabulary}: the ranks are not 0..{n_ranks - 1}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=1 << 30,
    )


_RENAMES = [
    (r"^transformer\.wte\.", "embed."),
    (r"^lm_head\.", "unembed."),
    (r"^transformer\.ln_f\.", "ln_final."),
    (r"^transformer\.h\.(\d+)\.ln_1\.", r"blocks.\1.ln1."),
    (r"^transformer\.h\.(\d+)\.ln_2\.", r"blocks.\1.ln2."),
    (r"^transformer\.h\.(\d+)\.attn\.c_proj\.", r"blocks.\1.attn.o_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.w1\.", r"blocks.\1.mlp.up_proj."),  # w1 * silu(w2)
    (r"^transformer\.h\.(\d+)\.mlp\.w2\.", r"blocks.\1.mlp.gate_proj."),
    (r"^transformer\.h\.(\d+)\.mlp\.c_proj\.", r"blocks.\1.mlp.down_proj."),
    (r"^transformer\.visual\.conv1\.", "vision.embed.patch_embedding."),
    (r"^transformer\.visual\.positional_embedding$", "vision.embed.position_embedding"),
    (r"^transformer\.visual\.ln_pre\.", "vision.ln_pre."),
    (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.ln_1\.", r"vision.blocks.\1.ln1."),
    (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.ln_2\.", r"vision.blocks.\1.ln2."),
    (
        r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.attn\.out_proj\.",
        r"vision.blocks.\1.attn.o_proj.",
    ),
    (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_fc\.", r"vision.blocks.\1.mlp.fc1."),
    (r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.mlp\.c_proj\.", r"vision.blocks.\1.mlp.fc2."),
    (r"^transformer\.visual\.attn_pool\.attn\.out_proj\.", "resampler.out."),
    (r"^transformer\.visual\.attn_pool\.query$", "resampler.queries"),
    (r"^transformer\.visual\.attn_pool\.", "resampler."),
    (r"^transformer\.visual\.ln_post\.", "resampler.ln_post."),
    (r"^transformer\.visual\.proj$", "resampler.proj"),
]  # fmt: skip
"""Release tensor names -> mmlens names (the fused projections are split by `_split_fused`)."""

_DECODER_QKV = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$")
_VISION_QKV = re.compile(
    r"^transformer\.visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj\.(weight|bias)$"
)
_RESAMPLER_QKV = re.compile(r"^transformer\.visual\.attn_pool\.attn\.in_proj_(weight|bias)$")


def release_tensors(folder: Path, n_vision_heads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """``(mmlens name, tensor)`` of every weight of the release in `folder`.

    Weights come from its safetensors shards (the index's, where there is one), else from
    ``pytorch_model*.bin`` with ``torch.load(weights_only=True)``, which unpickles tensors only.
    """
    for key, tensor in _read_tensors(folder):
        split = _split_fused(key, tensor, n_vision_heads)
        if split is not None:
            yield from split
            continue
        for pattern, replacement in _RENAMES:
            renamed, n = re.subn(pattern, replacement, key)
            if n:
                yield renamed, tensor
                break
        else:
            raise ValueError(f"{folder}: tensor {key!r} is not part of a Qwen-VL release")


def _split_fused(
    key: str, tensor: torch.Tensor, n_vision_heads: int
) -> list[tuple[str, torch.Tensor]] | None:
    """Query, key and value of a fused projection, or None for another tensor. The decoder's
    ``c_attn`` and the resampler's ``in_proj`` stack them ``[q; k; v]``; a vision block's
    ``in_proj`` lays them out per head (``[head, q k v, d_head]``, the release's
    ``VisualAttention`` splits each head's slice in three)."""
    if match := _DECODER_QKV.match(key):
        names, parts = (
            _names(f"blocks.{match[1]}.attn", "q_proj", "k_proj", "v_proj"),
            tensor.chunk(3),
        )
    elif match := _RESAMPLER_QKV.match(key):
        names, parts = _names("resampler", "query", "key", "value"), tensor.chunk(3)
    elif match := _VISION_QKV.match(key):
        names = _names(f"vision.blocks.{match[1]}.attn", "q_proj", "k_proj", "v_proj")
        parts = einops.rearrange(
            tensor, "(head qkv d_head) ... -> qkv (head d_head) ...", head=n_vision_heads, qkv=3
        )
    else:
        return None
    kind = "weight" if key.endswith("weight") else "bias"
    return [(f"{name}.{kind}", part.contiguous()) for name, part in zip(names, parts, strict=True)]


def _names(prefix: str, *names: str) -> list[str]:
    return [f"{prefix}.{name}" for name in names]


def _read_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        yield from safetensors_items(folder / shard for shard in shards)
        return
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        yield from safetensors_items(shards)
        return
    shards = sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model*.bin weights")
    for shard in shards:  # tensors only: weights_only refuses any other pickled object
        yield from torch.load(shard, map_location="cpu", weights_only=True).items()
