"""Delta releases: checkpoints published as the difference to a base model whose licence kept
it from being redistributed (Shikra over LLaMA-7B, the LLaVA v0 releases over LLaMA). The
release holds ``delta = target - base`` for every base tensor, with extra rows for the tokens it
adds (``<im_patch>``, ``<im_start>``, ``<im_end>``), and its new tensors (the projector) as they
are; `apply_delta` writes the target as the releases' own ``apply_delta.py`` does, from local
folders only (docs/checkpoints.md, "Shikra and the LLaVA v0 releases").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm

from mmlens.models.original import _read_tensors

_GROWN = ("model.embed_tokens.weight", "lm_head.weight")
"""Tensors whose delta has more rows than the base (the release's added tokens)."""


def apply_delta(base: str | Path, delta: str | Path, out: str | Path) -> Path:
    """Write ``target = base + delta`` to `out`: every tensor of the delta release plus the
    base model's tensor of the same name (the first rows only for the embedding and the output
    layer, whose extra rows are the added tokens'), the release's new tensors (projector,
    tower) unchanged, as one ``model.safetensors``; the release's config and tokenizer files
    are copied. `base` is a LLaMA folder (Hugging Face layout, safetensors or ``.bin``), `delta`
    the release as downloaded; both are read with ``weights_only``.

    Raises:
        ValueError: a base tensor is missing from the delta or has another shape (the wrong
            base model), naming the tensor.
        FileExistsError: `out` already holds weights.

    Examples:
        >>> from mmlens.testing.original import build_tiny_v0_release, split_into_delta
        >>> release = build_tiny_v0_release("releases/shikra")       # a random one
        >>> base, delta = split_into_delta(release, "published")      # as it is published
        >>> target = apply_delta(base, delta, "shikra-rebuilt")
        >>> type(mmlens.from_pretrained(target)).__name__
        'HookedLlava'
    """
    base, delta, out = Path(base), Path(delta), Path(out)
    if out.exists() and any(out.glob("*.safetensors")):
        raise FileExistsError(f"{out} already holds weights; choose an empty folder")
    base_tensors = _read_tensors(base)
    target = {}
    delta_tensors = _read_tensors(delta).items()
    for name, tensor in tqdm(delta_tensors, desc="applying the delta", unit=" tensors"):
        original = base_tensors.pop(name, None)
        if original is not None:
            tensor = tensor.clone()
            rows = original.shape[0]
            grown = name in _GROWN and tensor.shape[0] >= rows
            if (tensor.shape if not grown else tensor[:rows].shape) != original.shape:
                raise ValueError(
                    f"{name}: the delta's shape {tuple(tensor.shape)} does not fit the base's "
                    f"{tuple(original.shape)}; is {base} the model the delta was made from?"
                )
            tensor[:rows] += original.to(tensor.dtype)
        target[name] = tensor.contiguous()
    model_tensors = [name for name in base_tensors if not name.endswith("rotary_emb.inv_freq")]
    if model_tensors:
        raise ValueError(
            f"the base model has tensors the delta lacks ({sorted(model_tensors)[:3]}...): is "
            f"{delta} a delta release over {base}?"
        )
    out.mkdir(parents=True, exist_ok=True)
    for path in delta.iterdir():
        if path.is_file() and path.suffix not in (".bin", ".safetensors", ".py"):
            shutil.copy2(path, out / path.name)
    (out / "pytorch_model.bin.index.json").unlink(missing_ok=True)
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(target, out / "model.safetensors", metadata={"format": "pt"})
    return out
