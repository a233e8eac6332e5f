"""Tiny random releases in the original LLaVA v0 layout, the one Shikra and the LLaVA v0 releases
ship in (`build_tiny_v0_release`), and the delta-over-LLaMA form they are published as
(`split_into_delta`).

A release folder holds a Llama ``config.json`` with the ``mm_*`` settings (no
``mm_projector_type``: one linear projector; ``mm_use_im_start_end``; the tower's id in
``mm_vision_tower``), ``pytorch_model.bin`` (``model.*``, ``lm_head.weight``,
``model.mm_projector.weight`` / ``.bias``) and the tokenizer with ``<im_patch>``, ``<im_start>``
and ``<im_end>`` after the LLaMA vocabulary; the CLIP tower is a folder of its own beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from transformers import (
    CLIPImageProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from mmlens.testing.common import _CLIP_PIXELS, _clip_config, _decoder_config, _randomize_weights
from mmlens.testing.tokenizer import make_tokenizer

V0_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")
"""The tokens the v0 releases add after the LLaMA vocabulary, in order."""

KINDS = {
    "shikra": {"architectures": ["ShikraLlamaForCausalLM"], "model_type": "shikra"},
    "llava_v0": {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava"},
}
"""The release's model names in its ``config.json``, which pick its conversation."""


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """The Vicuna-style test tokenizer without llava-hf's ``<image>`` and ``<pad>`` (a LLaMA
    vocabulary, as the delta's base has)."""
    full = make_tokenizer("vicuna")
    content = json.loads(full.backend_tokenizer.to_str())
    first_added = full.convert_tokens_to_ids("<image>")
    content["added_tokens"] = [
        token for token in content["added_tokens"] if token["id"] < first_added
    ]
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(content)),
        bos_token=full.bos_token,
        eos_token=full.eos_token,
        unk_token=full.unk_token,
    )


def build_tiny_v0_release(
    path: str | Path,
    *,
    kind: str = "shikra",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 128,
    image_size: int = 56,
    patch_size: int = 14,
    vision_layer: int = -2,
    seed: int = 0,
) -> Path:
    """Write a random release of `kind` (``"shikra"`` or ``"llava_v0"``) to `path`: a Llama
    decoder of `n_layers`, a CLIP tower of two blocks on `image_size` px in `patch_size` px
    patches (Shikra's is 224 px in 14 px patches: 256 image tokens) in ``<path>-clip``, read at
    `vision_layer`, and a linear projector.

    Examples:
        >>> from mmlens.testing.original import build_tiny_v0_release
        >>> shikra = mmlens.from_pretrained(build_tiny_v0_release("checkpoints/shikra"))
        >>> shikra.default_template, shikra.prepare_defaults["template"]
        ('vicuna_v1', 'shikra')
    """
    path = Path(path)
    tower = path.with_name(path.name + "-clip")
    torch.manual_seed(seed)
    vision_config = _clip_config(2, 32, 4, image_size, patch_size)
    vision = CLIPVisionModel(vision_config).eval()
    _randomize_weights(vision)
    tower.mkdir(parents=True, exist_ok=True)  # the hub's CLIP folders name them vision_model.*
    weights = {f"vision_model.{name}": t.contiguous() for name, t in vision.state_dict().items()}
    save_file(weights, tower / "model.safetensors")
    vision_config.save_pretrained(tower)
    side = {"height": image_size, "width": image_size}
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size=side, **_CLIP_PIXELS
    ).save_pretrained(tower)

    tokenizer = llama_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in V0_TOKENS])
    config = _decoder_config(
        "vicuna", tokenizer, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
        n_kv_heads=None, d_mlp=d_mlp, rope_theta=None,
    )  # fmt: skip
    decoder = LlamaForCausalLM(config).eval()
    _randomize_weights(decoder)
    tensors = {name: tensor.clone() for name, tensor in decoder.state_dict().items()}
    generator = torch.Generator().manual_seed(seed + 1)
    tensors["model.mm_projector.weight"] = torch.randn(d_model, 32, generator=generator) / 32**0.5
    tensors["model.mm_projector.bias"] = 0.1 * torch.randn(d_model, generator=generator)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, path / "pytorch_model.bin")
    raw = {
        **config.to_dict(),
        **KINDS[kind],
        "mm_vision_tower": str(tower),
        "mm_hidden_size": 32,
        "mm_vision_select_layer": vision_layer,
        "mm_use_im_start_end": True,
        "use_mm_proj": True,
    }
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    tokenizer.save_pretrained(path)
    return path


def split_into_delta(release: str | Path, root: str | Path, seed: int = 1) -> tuple[Path, Path]:
    """The release at `release` as it is published: a random LLaMA base (Hugging Face layout,
    ``model.safetensors``, the vocabulary without the added tokens) in ``root/base`` and
    ``release - base`` in ``root/delta`` (the added tokens' rows and the projector as they
    are); `mmlens.models.delta.apply_delta` puts them back together. Returns (base, delta)."""
    release, root = Path(release), Path(root)
    tensors = torch.load(release / "pytorch_model.bin", weights_only=True)
    n_base = len(llama_tokenizer())
    generator = torch.Generator().manual_seed(seed)
    base, delta = {}, {}
    for name, tensor in tensors.items():
        if name.startswith("model.mm_projector."):
            delta[name] = tensor
            continue
        rows = (
            tensor[:n_base] if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor
        )
        base[name] = torch.randn(rows.shape, generator=generator)
        difference = tensor.clone()
        difference[: rows.shape[0]] -= base[name]
        delta[name] = difference
    (root / "base").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in base.items()}, root / "base" / "model.safetensors")
    (root / "delta").mkdir(exist_ok=True)
    torch.save(delta, root / "delta" / "pytorch_model.bin")
    for file in release.iterdir():
        if file.suffix != ".bin":
            (root / "delta" / file.name).write_bytes(file.read_bytes())
    return root / "base", root / "delta"
