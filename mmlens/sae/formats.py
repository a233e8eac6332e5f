"""Reading and writing SAEs: SAELens' folder format and Gemma Scope's releases, natively (no
`sae_lens` import), and the SAEs shipped in the zoo (docs/sae.md, "Formats").

- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (``sparsity.safetensors`` is ignored).
  The hook name is ``hook_name`` (SAELens 6: also under ``metadata``; before 6: ``hook_point``);
  a boolean ``normalize_activations`` is the old spelling of "none" /
  "expected_average_only_in"; a pre-6 "standard" config with ``activation_fn_str="topk"`` is a
  TopK SAE (``activation_fn_kwargs.k``).
- Gemma Scope 2 (the SAEs of the third generation): a folder ``{site}/layer_{L}_width_{W}_l0_{size}`` holding
  ``params.safetensors`` (``w_enc`` ``[d_in, d_sae]``, ``w_dec``, ``b_enc``, ``b_dec``,
  ``threshold``, for transcoders ``affine_skip_connection`` ``[d_in, d_out]``) and
  ``config.json`` (``architecture: "jump_relu"``). The site names the hook as SAELens maps it:
  resid_post -> ``blocks.L.hook_resid_post``, attn_out -> ``blocks.L.hook_attn_out``, mlp_out ->
  ``blocks.L.hook_mlp_out``, transcoder -> ``blocks.L.ln2.hook_normalized`` to
  ``blocks.L.hook_mlp_out``. Gemma Scope 1 (the second generation): ``params.npz`` with ``W_enc``, ``W_dec``,
  ``b_enc``, ``b_dec``, ``threshold``, its folder ``layer_L/...`` under a ``...-res`` /
  ``-mlp`` / ``-att`` release.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmlens.sae.autoencoder import SAEConfig, SparseAutoencoder

ZOO_SAES = {
    "tiny-shapes-sae": "ReLU SAE (256 features) on tiny-shapes' blocks.2.hook_resid_post, "
    "trained by train/train_sae.py; evaluation in docs/zoo.md",
}
"""SAEs shipped inside the package: names `load` accepts."""

SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
GEMMA_SCOPE_SITES = {
    "resid_post": ("blocks.{layer}.hook_resid_post", None),
    "attn_out": ("blocks.{layer}.hook_attn_out", None),
    "mlp_out": ("blocks.{layer}.hook_mlp_out", None),
    "transcoder": ("blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"),
}
"""Gemma Scope's sites (the folder names of a release) and the mmlens hook names (in, out)."""
_GEMMA_SCOPE_1_SITES = {"-res": "resid_post", "-mlp": "mlp_out", "-att": "attn_out"}


def load(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> SparseAutoencoder:
    """Load an SAE or transcoder from a folder (SAELens or Gemma Scope) or a zoo name.

    Args:
        path: a zoo name (`ZOO_SAES`), a folder with ``cfg.json`` + ``sae_weights.safetensors``
            (SAELens), with ``params.safetensors`` (+ ``config.json``, Gemma Scope 2) or with
            ``params.npz`` (Gemma Scope 1).
        device: where the weights go.
        dtype: the weights' dtype (default: the config's).

    Raises:
        FileNotFoundError: no such folder, or no SAE files in it (the message lists what is).
        ValueError: an architecture or normalization mmlens does not support, weights that do
            not match the config.

    Examples:
        >>> sae = mmlens.sae.load("tiny-shapes-sae")
        >>> sae.cfg.architecture, sae.cfg.hook_name, sae.cfg.d_in, sae.cfg.d_sae
        ('standard', 'blocks.2.hook_resid_post', 128, 256)
    """
    folder = _folder(path)
    if (folder / SAELENS_CONFIG).is_file():
        cfg, weights = _read_saelens(folder)
    elif (folder / "params.safetensors").is_file() or (folder / "params.npz").is_file():
        cfg, weights = _read_gemma_scope(folder)
    else:
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise FileNotFoundError(
            f"{folder} holds no SAE: expected {SAELENS_CONFIG} + {SAELENS_WEIGHTS} (SAELens) or "
            f"params.safetensors / params.npz (Gemma Scope); found {present or 'nothing'}"
        )
    if dtype is not None:
        cfg.dtype = str(dtype).removeprefix("torch.")
    return SparseAutoencoder(cfg, weights).to(device)


def save(sae: SparseAutoencoder, folder: str | Path) -> Path:
    """Write `sae` in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``); returns the
    folder. SAELens reads the result (its config keys, flat).

    Examples:
        >>> sae = mmlens.sae.load("tiny-shapes-sae")
        >>> mmlens.sae.load(mmlens.sae.save(sae, "my-sae")).cfg.d_sae
        256
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {key: value for key, value in sae.cfg.to_dict().items() if key != "source"}
    if not sae.cfg.is_transcoder:
        del cfg["d_out"], cfg["hook_name_out"]
    if cfg["k"] is None:
        del cfg["k"]
    (folder / SAELENS_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    weights = {name: p.detach().contiguous().cpu() for name, p in sae.named_parameters()}
    save_file(weights, str(folder / SAELENS_WEIGHTS))
    return folder


def fingerprint(path: str | Path) -> str:
    """A short hash of an SAE's files by content (config and weights), so that a run's manifest
    names the SAE it used and a resume refuses one changed in place.

    Examples:
        >>> from mmlens.sae.formats import fingerprint
        >>> len(fingerprint("tiny-shapes-sae"))
        16
    """
    from mmlens.loading import file_digest

    folder = _folder(path)
    names = (SAELENS_CONFIG, SAELENS_WEIGHTS, "config.json", "params.safetensors", "params.npz")
    digest = hashlib.blake2b(digest_size=8)
    for name in names:
        if (folder / name).is_file():
            digest.update(f"{name}:{file_digest(folder / name)};".encode())
    return digest.hexdigest()


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if folder.exists():
        return folder
    if str(path) in ZOO_SAES:
        return Path(__file__).resolve().parents[1] / "zoo" / str(path)
    raise FileNotFoundError(
        f"no SAE folder {str(path)!r}; pass a folder (SAELens: {SAELENS_CONFIG} + "
        f"{SAELENS_WEIGHTS}; Gemma Scope: params.safetensors) or a zoo name "
        f"({', '.join(ZOO_SAES)})"
    )


def _read_saelens(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    raw = json.loads((folder / SAELENS_CONFIG).read_text())
    meta = raw.get("metadata") or raw.get("meta") or {}
    hook_name = raw.get("hook_name") or raw.get("hook_point") or meta.get("hook_name")
    if not hook_name:
        raise ValueError(f"{folder / SAELENS_CONFIG} names no hook (hook_name or hook_point)")
    architecture = raw.get("architecture", "standard")
    k = raw.get("k")
    activation_fn = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
    if architecture == "standard" and activation_fn == "topk":  # SAELens before 6
        architecture, k = "topk", (raw.get("activation_fn_kwargs") or {}).get("k")
    normalize = raw.get("normalize_activations", "none")
    if isinstance(normalize, bool) or normalize is None:
        normalize = "expected_average_only_in" if normalize else "none"
    weights_path = folder / SAELENS_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{folder} has {SAELENS_CONFIG} but no {SAELENS_WEIGHTS}")
    cfg = SAEConfig(
        architecture=architecture,
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        hook_name=hook_name,
        d_out=int(raw.get("d_out") or 0),
        hook_name_out=raw.get("hook_name_out") or meta.get("hook_name_out"),
        k=k,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=normalize,
        dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
        source=str(folder),
    )
    return cfg, load_file(str(weights_path))


def _read_gemma_scope(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    if (folder / "params.safetensors").is_file():
        raw = {k.lower(): v for k, v in load_file(str(folder / "params.safetensors")).items()}
    else:
        import numpy as np

        with np.load(folder / "params.npz") as npz:
            raw = {k.lower(): torch.from_numpy(npz[k]) for k in npz.files}
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("architecture", "jump_relu") != "jump_relu":
        raise ValueError(
            f"{config_path}: architecture {config['architecture']!r}; Gemma Scope releases "
            "mmlens reads are jump_relu"
        )
    hook_in, hook_out = _gemma_scope_hooks(folder)
    weights = {
        "W_enc": raw["w_enc"],
        "W_dec": raw["w_dec"],
        "b_enc": raw["b_enc"],
        "b_dec": raw["b_dec"],
        "threshold": raw["threshold"],
    }
    if "affine_skip_connection" in raw:
        weights["W_skip"] = raw["affine_skip_connection"].T
    d_in, d_sae = weights["W_enc"].shape
    transcoder = hook_out is not None
    cfg = SAEConfig(
        architecture=(
            ("jumprelu_skip_transcoder" if "W_skip" in weights else "jumprelu_transcoder")
            if transcoder
            else "jumprelu"
        ),
        d_in=int(d_in),
        d_sae=int(d_sae),
        hook_name=hook_in,
        d_out=int(weights["W_dec"].shape[-1]),
        hook_name_out=hook_out,
        apply_b_dec_to_input=False,
        source=str(folder),
    )
    return cfg, weights


def _gemma_scope_hooks(folder: Path) -> tuple[str, str | None]:
    """The hook names a Gemma Scope folder's place in its release implies
    (`GEMMA_SCOPE_SITES`): Gemma Scope 2 ``{site}/layer_L_...``, Gemma Scope 1
    ``...-res/layer_L/...`` (a Hugging Face cache's ``models--google--gemma-scope-2b-pt-res``)."""
    parts = folder.resolve().parts
    layer = next((m for part in reversed(parts) if (m := re.match(r"layer_(\d+)", part))), None)
    site = next((part for part in reversed(parts) if part in GEMMA_SCOPE_SITES), None)
    if site is None:
        site = next(
            (
                name
                for part in parts
                for end, name in _GEMMA_SCOPE_1_SITES.items()
                if part.endswith(end)
            ),
            None,
        )
    if layer is None or site is None:
        raise ValueError(
            f"{folder}: a Gemma Scope folder lies in its release's layout, which names the "
            f"layer (layer_L) and the site ({', '.join(GEMMA_SCOPE_SITES)}; Gemma Scope 1: a "
            "release ending in -res, -mlp or -att); keep that layout"
        )
    hook_in, hook_out = GEMMA_SCOPE_SITES[site]
    number = int(layer.group(1))
    return hook_in.format(layer=number), hook_out and hook_out.format(layer=number)
