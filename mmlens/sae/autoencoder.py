"""The sparse autoencoder (and transcoder) as a module: SAELens' inference semantics for the
standard (ReLU), JumpReLU and TopK architectures (docs/sae.md, "Semantics").

An SAE reads an activation `x` at its hook point and writes a reconstruction there:

    sae_in   = normalize(x) - b_dec * apply_b_dec_to_input        (transcoders: no b_dec term)
    acts_pre = sae_in @ W_enc + b_enc
    acts     = relu(acts_pre)                                      standard
             = relu(acts_pre) * (acts_pre > threshold)             jumprelu
             = relu of the k largest acts_pre, 0 elsewhere         topk
    recons   = denormalize(acts @ W_dec + b_dec) (+ x @ W_skip.T for a skip transcoder)

A transcoder reads its input at `hook_name` (the MLP's input) and writes the MLP's output at
`hook_name_out`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedRootModule

from mmlens.hooks import HookPoint

ACTIVATIONS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
"""SAE architectures and their activation function."""
TRANSCODERS = {
    "transcoder": "relu",
    "skip_transcoder": "relu",
    "jumprelu_transcoder": "jumprelu",
    "jumprelu_skip_transcoder": "jumprelu",
}
"""Transcoder architectures (MLP input -> MLP output) and their activation function."""
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
"""SAELens' `normalize_activations` values; ``expected_average_only_in`` changes nothing at
inference (SAELens folds its scaling factor into the weights before saving)."""
HOOK_POINTS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)
"""The SAE's hook points, SAELens' names; spliced into a model they are
``{hook_name}.{point}``."""


@dataclass
class SAEConfig:
    """What an SAE is: its architecture, sizes, where it attaches and how it treats its input.

    Attributes:
        architecture: a key of `ACTIVATIONS` or `TRANSCODERS`.
        d_in: width of the activation it reads.
        d_sae: number of features.
        hook_name: the mmlens hook point it reads (and, for an SAE, writes).
        d_out: width of what it writes (an SAE: `d_in`).
        hook_name_out: a transcoder's output hook point (None for an SAE).
        k: active features per position (topk only).
        apply_b_dec_to_input: subtract `b_dec` from the input before encoding (SAEs only).
        normalize_activations: one of `NORMALIZATIONS`.
        dtype: the weights' dtype name.
        source: where it was loaded from (for messages and manifests).
    """

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    d_out: int = 0
    hook_name_out: str | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    source: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in {**ACTIVATIONS, **TRANSCODERS}:
            raise ValueError(
                f"SAE architecture {self.architecture!r} is not supported; supported: "
                f"{', '.join([*ACTIVATIONS, *TRANSCODERS])}"
            )
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not one of "
                f"{', '.join(NORMALIZATIONS)}"
            )
        if self.architecture == "topk" and not (isinstance(self.k, int) and self.k >= 1):
            raise ValueError(f"a topk SAE needs k >= 1 in its config, got k={self.k!r}")
        if self.is_transcoder and not self.hook_name_out:
            raise ValueError(f"a {self.architecture} needs hook_name_out (its output hook)")
        self.d_out = self.d_out or self.d_in

    @property
    def is_transcoder(self) -> bool:
        return self.architecture in TRANSCODERS

    @property
    def activation(self) -> str:
        """ "relu", "jumprelu" or "topk"."""
        return {**ACTIVATIONS, **TRANSCODERS}[self.architecture]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SparseAutoencoder(HookedRootModule):
    """An SAE or transcoder with SAELens' hook points (`HOOK_POINTS`).

    Parameters: `W_enc` ``[d_in, d_sae]``, `b_enc` ``[d_sae]``, `W_dec` ``[d_sae, d_out]``,
    `b_dec` ``[d_out]``; `threshold` ``[d_sae]`` (JumpReLU); `W_skip` ``[d_out, d_in]`` (skip
    transcoders). Build one with `mmlens.sae.load` (or from weights, as `train/train_sae.py`).

    Examples:
        >>> sae = mmlens.sae.load("tiny-shapes-sae")
        >>> x = torch.randn(2, 5, sae.cfg.d_in)
        >>> acts = sae.encode(x)
        >>> acts.shape, torch.allclose(sae.decode(acts), sae(x))
        (torch.Size([2, 5, 256]), True)
        >>> torch.allclose(sae(x, use_error_term=True), x, atol=1e-5)   # reconstruction + error
        True
    """

    def __init__(self, cfg: SAEConfig, weights: dict[str, Tensor]):
        super().__init__()
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        shapes = {
            "W_enc": (cfg.d_in, cfg.d_sae),
            "b_enc": (cfg.d_sae,),
            "W_dec": (cfg.d_sae, cfg.d_out),
            "b_dec": (cfg.d_out,),
        }
        if cfg.activation == "jumprelu":
            shapes["threshold"] = (cfg.d_sae,)
        if "W_skip" in weights:
            shapes["W_skip"] = (cfg.d_out, cfg.d_in)
        missing = sorted(set(shapes) - set(weights))
        if missing:
            raise ValueError(
                f"SAE {cfg.source or cfg.hook_name}: weights {missing} are missing for a "
                f"{cfg.architecture} SAE (found {sorted(weights)})"
            )
        for name, shape in shapes.items():
            if tuple(weights[name].shape) != shape:
                raise ValueError(
                    f"SAE {cfg.source or cfg.hook_name}: {name} has shape "
                    f"{tuple(weights[name].shape)}, the config (d_in={cfg.d_in}, "
                    f"d_sae={cfg.d_sae}, d_out={cfg.d_out}) says {shape}"
                )
            self.register_parameter(name, nn.Parameter(weights[name].to(dtype).clone()))
        for name in HOOK_POINTS:
            setattr(self, name, HookPoint())
        self.setup()

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of `x` (through `hook_sae_input`, `_acts_pre`, `_acts_post`)."""
        return self._encode(x, self._scale(x), hooked=True)

    def decode(
        self, acts: Float[Tensor, "... d_sae"], x: Float[Tensor, "... d_in"] | None = None
    ) -> Float[Tensor, "... d_out"]:
        """The reconstruction from feature activations (through `hook_sae_recons`).

        `x`, the input the activations came from, is needed where the SAE normalizes its input
        per position (``constant_norm_rescale``, ``layer_norm``: the output gets the input's
        scale back) and for a skip transcoder (``+ x @ W_skip.T``).
        """
        return self._decode(acts, x, None if x is None else self._scale(x), hooked=True)

    def forward(
        self,
        x: Float[Tensor, "... d_in"],
        use_error_term: bool = False,
        target: Float[Tensor, "... d_out"] | None = None,
    ) -> Float[Tensor, "... d_out"]:
        """The reconstruction of `x`, through every hook point; with `use_error_term`, plus
        the error of the reconstruction computed without hooks (`hook_sae_error`, as SAELens:
        outside autograd), which makes the output equal `target` (default `x`; a transcoder:
        the MLP output it replaces) unless a hook edits features."""
        scale = self._scale(x)
        out = self._decode(self._encode(x, scale, hooked=True), x, scale, hooked=True)
        if use_error_term:
            if target is None and self.cfg.is_transcoder:
                raise ValueError(
                    "a transcoder's error term needs the MLP output it replaces (target=...); "
                    "spliced into a model (model.run_with_saes) it gets it"
                )
            out = out + self.error(x, x if target is None else target, scale)
        return self.hook_sae_output(out)

    def error(
        self,
        x: Float[Tensor, "... d_in"],
        target: Float[Tensor, "... d_out"],
        scale: Any = None,
    ) -> Float[Tensor, "... d_out"]:
        """`target` minus the hook-free reconstruction of `x`, outside autograd, through
        `hook_sae_error` (an SAE: target is x; a transcoder: the MLP's output)."""
        with torch.no_grad():
            scale = self._scale(x) if scale is None else scale
            clean = self._decode(self._encode(x, scale, hooked=False), x, scale, hooked=False)
            difference = target.to(clean.dtype) - clean
        return self.hook_sae_error(difference)

    def _scale(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The input normalization per position, as SAELens computes it: (shift, divisor of
        the input, factor of the output), or None."""
        norm = self.cfg.normalize_activations
        x = x.to(self.dtype)
        if norm == "constant_norm_rescale":  # norm sqrt(d_in) in, the input's norm out
            size = x.norm(dim=-1, keepdim=True) / self.cfg.d_in**0.5
            return torch.zeros_like(size), size, size
        if norm == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            std = (x - mean).std(dim=-1, keepdim=True)
            return mean, std + 1e-5, std
        return None

    def _encode(self, x: Tensor, scale: Any, hooked: bool) -> Tensor:
        hook = _hook if hooked else _no_hook
        sae_in = hook(self.hook_sae_input, x.to(self.dtype))
        if scale is not None:
            sae_in = (sae_in - scale[0]) / scale[1]
        if self.cfg.apply_b_dec_to_input and not self.cfg.is_transcoder:
            sae_in = sae_in - self.b_dec
        pre = hook(self.hook_sae_acts_pre, sae_in @ self.W_enc + self.b_enc)
        return hook(self.hook_sae_acts_post, self._activation(pre))

    def _activation(self, pre: Tensor) -> Tensor:
        kind = self.cfg.activation
        if kind == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        if kind == "topk":
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return torch.relu(pre)

    def _decode(self, acts: Tensor, x: Tensor | None, scale: Any, hooked: bool) -> Tensor:
        hook = _hook if hooked else _no_hook
        out = hook(self.hook_sae_recons, acts.to(self.dtype) @ self.W_dec + self.b_dec)
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            if scale is None:
                raise ValueError(
                    f"this SAE normalizes its input ({self.cfg.normalize_activations}): pass "
                    "the input to decode(acts, x) so that the output gets its scale back"
                )
            if not self.cfg.is_transcoder:  # SAELens leaves a transcoder's output as it is
                out = out * scale[2] + scale[0]
        if "W_skip" in self._parameters:
            if x is None:
                raise ValueError("a skip transcoder's decode needs its input: decode(acts, x)")
            out = out + x.to(self.dtype) @ self.W_skip.T
        return out

    def extra_repr(self) -> str:
        cfg = self.cfg
        where = f"{cfg.hook_name} -> {cfg.hook_name_out}" if cfg.is_transcoder else cfg.hook_name
        return f"{cfg.architecture}, d_in={cfg.d_in}, d_sae={cfg.d_sae}, at {where}"


def _hook(point: HookPoint, tensor: Tensor) -> Tensor:
    return point(tensor)


def _no_hook(point: HookPoint, tensor: Tensor) -> Tensor:
    return tensor
