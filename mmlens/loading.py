"""Load Hugging Face checkpoints (llava-hf folders or cached hub ids), or a registered release
format (`CheckpointFormat`), into mmlens models.

The HF model is never instantiated: mmlens builds its own modules on the meta device and
assigns each safetensors tensor, renamed and cast, straight into them. No remote code runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

# Checkpoint prefixes differ between transformers versions (llava-hf hub checkpoints use
# `language_model.model.`, transformers >= 4.52 saves `model.language_model.`); normalise first.
Rule = tuple[str, str]
"""A rename: a regular expression over a tensor name and its replacement."""

_PREFIXES = [
    (r"^(?:model\.)?language_model\.lm_head\.", "unembed."),
    (r"^lm_head\.", "unembed."),
    (r"^(?:model\.)?language_model\.(?:model\.)?", "lm."),
    (r"^model\.(?=layers\.|embed_tokens\.|norm\.)", "lm."),  # text-only Llama/Mistral checkpoints
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?", "vision."),
    (r"^(?:model\.)?vision_model\.", "vision."),
    (r"^(?:model\.)?multi_modal_projector\.", "projector."),
    (r"^(?:model\.)?image_newline$", "image_newline"),
]
_RENAMES = [
    (r"^lm\.embed_tokens\.", "embed."),
    (r"^lm\.norm\.", "ln_final."),
    (r"^lm\.layers\.(\d+)\.self_attn\.", r"blocks.\1.attn."),
    (r"^lm\.layers\.(\d+)\.input_layernorm\.", r"blocks.\1.ln1."),
    (r"^lm\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln2."),
    (r"^lm\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
    (r"^vision\.embeddings\.", "vision.embed."),
    (r"^vision\.pre_layrnorm\.", "vision.ln_pre."),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"vision.blocks.\1.attn.o_proj."),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"vision.blocks.\1.attn.o_proj."),
    (r"^vision\.encoder\.layers\.(\d+)\.self_attn\.", r"vision.blocks.\1.attn."),
    (r"^vision\.encoder\.layers\.(\d+)\.layer_norm1\.", r"vision.blocks.\1.ln1."),
    (r"^vision\.encoder\.layers\.(\d+)\.layer_norm2\.", r"vision.blocks.\1.ln2."),
    (r"^vision\.encoder\.layers\.(\d+)\.mlp\.", r"vision.blocks.\1.mlp."),
]
# Weights LLaVA never uses (CLIP's pooled-output norm) and non-weight buffers.
_UNUSED = re.compile(r"^vision\.post_layernorm\.|^vision\.head\.|position_ids$")


def mmlens_key(
    hf_key: str, prefixes: Sequence[Rule] = (), renames: Sequence[Rule] = ()
) -> str | None:
    """The mmlens state-dict name of a HF checkpoint tensor, or None if mmlens never uses it.

    `prefixes` and `renames` are a family's own rules (its class's `weight_prefixes` and
    `weight_renames`), tried before the shared decoder, tower and projector rules.

    >>> mmlens_key("model.language_model.layers.3.self_attn.q_proj.weight")
    'blocks.3.attn.q_proj.weight'
    """
    key = hf_key
    for pattern, replacement in [*prefixes, *_PREFIXES]:
        key, n = re.subn(pattern, replacement, key)
        if n:
            break
    if _UNUSED.search(key):
        return None
    for pattern, replacement in [*renames, *_RENAMES]:
        key, n = re.subn(pattern, replacement, key)
        if n:
            break
    return key


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; a hub id from the local HF cache, else a clear error. Nothing is
    downloaded: a misspelt folder or zoo name never reaches the network."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; pass a folder written by save_pretrained"
            )
        return path
    repo_id = str(path_or_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception as not_cached:
        raise _not_available(repo_id, HF_HUB_CACHE) from not_cached


def _not_available(name: str, cache: str) -> FileNotFoundError:
    import difflib

    from mmlens.zoo.catalog import MODELS  # in here: the zoo's package imports this module

    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return FileNotFoundError(
        f"model {name!r} is not a checkpoint folder, a zoo name ({', '.join(MODELS)}) or a hub "
        f"id in the local Hugging Face cache ({cache}); {hint}mmlens downloads nothing: to use "
        f"a hub id, fetch it first (`hf download {name}`) or point HF_HOME / HF_HUB_CACHE at a "
        "cache that holds it, or pass a checkpoint folder (config.json, *.safetensors, tokenizer "
        "and processor files)"
    )


# Files in which transformers looks for `auto_map` (classes defined by Python files in the folder).
_CONFIG_FILES = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "image_processor_config.json",
)


def checkpoint_fingerprint(folder: str | os.PathLike) -> str:
    """A short hash of a checkpoint folder by content: its config.json and the bytes of every
    weight file the model reads (`weight_files`), streamed in chunks (run manifests record it,
    so a resumed run refuses weights changed in place, docs/experiments.md).

    Examples:
        >>> fingerprint = checkpoint_fingerprint(mmlens.zoo.checkpoint_path("tiny-shapes"))
        >>> len(fingerprint), fingerprint == checkpoint_fingerprint(mmlens.zoo.checkpoint_path("tiny-shapes"))
        (16, True)
    """
    folder = Path(folder)
    digest = hashlib.blake2b(digest_size=16)
    digest.update((folder / "config.json").read_bytes())
    files = weight_files(folder, required=False)
    if not files:  # a release format (docs/checkpoints.md): every weight-like file it holds
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    for path in files:
        digest.update(f"{path.name}:{file_digest(path)};".encode())
    return digest.hexdigest()[:16]


_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_CHUNK = 1 << 22


def file_digest(path: str | os.PathLike) -> str:
    """A hash of the file's bytes, read in 4 MiB chunks (cached in this process by path, size,
    modification time and inode, so a large checkpoint is read once)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _DIGESTS:
        digest = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.safetensors$")


def weight_files(folder: str | os.PathLike, *, required: bool = True) -> list[Path]:
    """The safetensors files a Hugging Face checkpoint folder's model is read from: those its
    ``model.safetensors.index.json`` names, else its one ``*.safetensors`` file, else a complete
    set of shards ``NAME-0000i-of-0000n.safetensors``. Any other mix of ``*.safetensors`` files
    is ambiguous (a stray copy would silently override weights) and refused.

    Raises:
        ValueError: the folder holds several ``*.safetensors`` files and no index, or the index
            is damaged or names a file that is not there.
        FileNotFoundError: no ``*.safetensors`` file (only if `required`).
    """
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            KeyError,
            TypeError,
            AttributeError,
        ) as error:
            raise ValueError(
                f"{index} is not a valid safetensors index (a JSON object with a 'weight_map' "
                f"of tensor name -> file): {type(error).__name__}: {error}"
            ) from None
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ValueError(f"{index} names weight file(s) {missing} that are not in {folder}")
        return [folder / name for name in names]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) > 1:
        shards = [_SHARD.match(path.name) for path in files]
        counts = {(m["stem"], m["count"]) for m in shards if m}
        if not (
            all(shards)
            and len(counts) == 1
            and sorted(int(m["index"]) for m in shards) == list(range(1, len(files) + 1))
            and int(next(iter(counts))[1]) == len(files)
        ):
            raise ValueError(
                f"{folder} holds several safetensors files ({', '.join(p.name for p in files)}) "
                "and no model.safetensors.index.json, so which weights to read is ambiguous; "
                "remove the stray file(s), or add the index that names the weight files"
            )
    if not files and required:
        raise FileNotFoundError(
            f"{folder} has no *.safetensors weights; mmlens loads safetensors only "
            "(re-save a .bin checkpoint with save_pretrained(safe_serialization=True))"
        )
    return files


def refuse_custom_code(folder: Path) -> None:
    """Raise if the checkpoint asks to run its own Python code (`auto_map` in a config file).

    transformers would offer to run such code ("Do you wish to run the custom code? [y/N]");
    mmlens never runs code from a checkpoint folder (docs/checkpoints.md).
    """
    for name in _CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if isinstance(content, dict) and "auto_map" in content:
            raise ValueError(
                f"{path} has an 'auto_map' ({sorted(content['auto_map'])}): the checkpoint asks to "
                "run Python code from its folder, and mmlens never runs checkpoint code. Use a "
                "checkpoint in the llava-hf layout (docs/checkpoints.md lists the supported model "
                f"types), or delete 'auto_map' from {name} if the folder's model_type is one of "
                "them"
            )


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("bfloat16", "torch.float16", "fp32").

    >>> as_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(name, name)
        resolved = getattr(torch, name, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16'")
        dtype = resolved
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a floating type (torch.float32, torch.bfloat16, torch.float16), "
            f"got {dtype!r}"
        )
    return dtype


def checkpoint_tensors(
    folder: Path,
    dtype: torch.dtype,
    device: str | torch.device,
    prefixes: Sequence[Rule] = (),
    renames: Sequence[Rule] = (),
) -> dict[str, torch.Tensor]:
    """Every used tensor of the checkpoint under its mmlens name (`mmlens_key` with a family's
    `prefixes` and `renames`), cast and moved one by one."""
    shards = weight_files(folder)
    items = safetensors_items(shards)
    return renamed_tensors(items, dtype, device, prefixes, renames)


def safetensors_items(shards: Iterable[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor of the safetensors `shards`, read one at a time; an
    unreadable file is a ValueError that names it."""
    for shard in shards:
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except FileNotFoundError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise ValueError(
                f"safetensors file {shard} cannot be read ({type(error).__name__}: {error}); "
                "it is damaged or not a safetensors file: download or save it again"
            ) from error


def renamed_tensors(
    hf_tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: torch.dtype,
    device: str | torch.device,
    prefixes: Sequence[Rule] = (),
    renames: Sequence[Rule] = (),
) -> dict[str, torch.Tensor]:
    """`hf_tensors` (``(llava-hf name, tensor)`` pairs) under mmlens names (`mmlens_key`), cast
    and moved one by one; tensors mmlens never uses are dropped."""
    tensors = {}
    for hf_key, tensor in hf_tensors:
        key = mmlens_key(hf_key, prefixes, renames)
        if key is not None:
            for name, part in _in_mmlens_layout(key, tensor):
                tensors[name] = part.to(device=device, dtype=dtype)
    return tensors


def _in_mmlens_layout(key: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensor` as the mmlens module holds it: a tower's fused query/key/value projection split
    into three (a missing key bias is stored as zeros), and a tower's position table as the
    weight of an embedding."""
    if re.search(r"\.attn\.qkv\.(weight|bias)$", key):
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
            yield key.replace(".qkv.", f".{name}."), part
    elif key == "vision.embed.position_embedding":  # CLIP's is an nn.Embedding already
        yield f"{key}.weight", tensor.reshape(-1, tensor.shape[-1])
    else:
        yield key, tensor


@dataclass(frozen=True)
class CheckpointFormat:
    """A release format other than the Hugging Face layout, registered by the module that
    reads it (`register_checkpoint_format`; the original LLaVA releases:
    `mmlens.models.original`), so that loading names no format of its own.

    Attributes:
        name: in messages.
        matches: whether a folder holds this format.
        hf_config: folder -> the equivalent HF config (its `model_type` picks the class).
        processor: folder -> the processor `prepare` uses.
        tensors: folder -> ``(HF name, tensor)`` pairs, renamed from there as an HF folder's.
        prepare_defaults: ``(folder, the class's default template)`` -> `prepare`'s defaults
            (the prompt and image settings the release was trained with).
        reads_every_file: mmlens reads every file of the folder itself (no transformers
            loader sees it), so an ``auto_map`` naming the release's own code is not refused:
            that code never runs (a remote-code release that mmlens implements natively).
    """

    name: str
    matches: Callable[[Path], bool]
    hf_config: Callable[[Path], Any]
    processor: Callable[[Path], Any]
    tensors: Callable[[Path], Iterable[tuple[str, torch.Tensor]]]
    prepare_defaults: Callable[[Path, str], dict[str, str]]
    reads_every_file: bool = False


CHECKPOINT_FORMATS: list[CheckpointFormat] = []
"""The registered release formats, tried in order before the Hugging Face layout."""


def register_checkpoint_format(checkpoint_format: CheckpointFormat) -> CheckpointFormat:
    """Add a release format (its module calls this once)."""
    CHECKPOINT_FORMATS.append(checkpoint_format)
    return checkpoint_format


def checkpoint_format(folder: Path) -> CheckpointFormat | None:
    """The registered format of `folder`, None for the Hugging Face layout."""
    return next((fmt for fmt in CHECKPOINT_FORMATS if fmt.matches(folder)), None)


RELEASE_NOISE = ("You are using a model of type", "requires torchvision (not installed)")
"""Parts of transformers' log messages that loading a checkpoint makes about what mmlens
handles itself: a release's own ``model_type`` (its config.json, a full CLIP config for its
tower) read with the config class mmlens chose, and the PIL image processors mmlens runs without
torchvision (not a dependency). `quiet_release_noise` drops them."""


class _DropReleaseNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(part in str(record.msg) for part in RELEASE_NOISE)


@contextmanager
def quiet_release_noise() -> Iterator[None]:
    """Within the block, transformers' messages in `RELEASE_NOISE` are not printed (filtered at
    transformers' handlers and the root logger's, where they would go); every other message
    is."""
    drop = _DropReleaseNoise()
    handlers = [*logging.getLogger("transformers").handlers, *logging.getLogger().handlers]
    for handler in handlers:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(drop)


def read_checkpoint(path_or_id: str | os.PathLike) -> tuple[Path, Any]:
    """The checkpoint's folder and HF config, refusing folders that ask to run their own code.
    A folder in a registered release format gets its equivalent HF config
    (`CheckpointFormat.hf_config`); a format that reads every file itself may name its own
    code in ``auto_map`` (`CheckpointFormat.reads_every_file`)."""
    from transformers import AutoConfig

    folder = resolve_checkpoint(path_or_id)
    release = checkpoint_format(folder)
    if release is None or not release.reads_every_file:
        refuse_custom_code(folder)
    if release is not None:
        return folder, release.hf_config(folder)
    return folder, AutoConfig.from_pretrained(folder, trust_remote_code=False)


def load_weights(
    model_cls: type,
    folder: Path,
    hf_config: Any,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
) -> Any:
    """Build `model_cls` for the checkpoint on the meta device and assign its weights, renamed
    (the class's `weight_prefixes` and `weight_renames`, then the shared rules) and cast tensor
    by tensor (the class's `from_pretrained` calls this). The config is the class's
    `config_from_hf`; parameters HF stores with leading batch dimensions of 1 lose them."""
    from transformers import AutoTokenizer

    dtype = as_dtype(dtype)
    cfg = model_cls.config_from_hf(
        hf_config, dtype=dtype, device=device, model_name=model_name or str(folder)
    )
    release = checkpoint_format(folder)
    if release is not None:
        processor = release.processor(folder)
        extra = {"tokenizer": processor.tokenizer, "processor": processor}
    elif cfg.vision is not None:
        processor = model_cls.load_processor(folder, hf_config)
        extra = {"tokenizer": processor.tokenizer, "processor": processor}
    else:
        extra = {"tokenizer": AutoTokenizer.from_pretrained(folder, trust_remote_code=False)}

    with torch.device("meta"):
        model = model_cls(cfg, **extra)
    rules = (model_cls.weight_prefixes, model_cls.weight_renames)
    if release is not None:
        tensors = renamed_tensors(release.tensors(folder), dtype, device, *rules)
        model.prepare_defaults = release.prepare_defaults(folder, model.default_template)
    else:
        tensors = checkpoint_tensors(folder, dtype, device, *rules)
    if cfg.tie_word_embeddings or "unembed.weight" not in tensors:
        tensors["unembed.weight"] = tensors["embed.weight"]
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match {model_cls.__name__}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    for name, tensor in tensors.items():
        shape = expected[name].shape
        if tensor.shape != shape and tensor.shape == (1,) * (tensor.ndim - len(shape)) + shape:
            tensors[name] = tensor.reshape(shape)  # e.g. a [1, 1, d] class embedding
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device).eval()
