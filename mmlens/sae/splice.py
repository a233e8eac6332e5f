"""Splicing SAEs into a model for the length of a `with` block (`SAEScope`; the model's
`saes`, `run_with_saes` and `run_with_cache_with_saes` use it).

Inside the block, the activation at an SAE's hook point is replaced by its reconstruction (with
`use_error_term`, plus the reconstruction error, so that the model's outputs do not change
unless a hook edits features), and the SAE's hook points join the model's as
``{hook_name}.hook_sae_input``, ``.hook_sae_acts_pre``, ``.hook_sae_acts_post``,
``.hook_sae_recons``, ``.hook_sae_error``, ``.hook_sae_output`` (SAELens' names): they can be
cached and hooked like any other, and compose with every ablation (hook lists). A transcoder
reads at its `hook_name` and replaces the activation at its `hook_name_out`; its hook points
take the input hook's name. The hook point itself (``blocks.2.hook_resid_post``) stays: its
hooks and the cache see what flows on, the spliced value.

On exit, also after an error or a Ctrl-C at any moment, the splice hooks, every hook added on
the SAE's hook points and the names are gone (`mmlens.hooks.run_to_completion`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from mmlens.hooks import HookScope, remove_hooks, run_to_completion
from mmlens.sae.autoencoder import HOOK_POINTS, SparseAutoencoder


class SAEScope:
    """SAEs spliced into `model` while the block runs.

    Examples:
        >>> sae = mmlens.sae.load("tiny-shapes-sae")
        >>> with mmlens.sae.SAEScope(model, [sae]):
        ...     logits, cache = model.run_with_cache(inp, names_filter=lambda n: "sae" in n)
        >>> cache["blocks.2.hook_resid_post.hook_sae_acts_post"].shape
        torch.Size([1, 105, 256])
        >>> "blocks.2.hook_resid_post.hook_sae_input" in model.hook_dict   # gone after the block
        False
    """

    def __init__(
        self,
        model: Any,
        saes: Sequence[SparseAutoencoder],
        use_error_term: bool = False,
        fwd_hooks: Sequence[tuple[Any, Callable]] = (),
    ):
        if isinstance(saes, SparseAutoencoder):
            saes = [saes]
        self.model, self.saes, self.use_error_term = model, list(saes), use_error_term
        self.fwd_hooks = list(fwd_hooks)
        self._check()
        self.points = {
            f"{sae.cfg.hook_name}.{name}": getattr(sae, name)
            for sae in self.saes
            for name in HOOK_POINTS
        }
        self.hook_scope: HookScope | None = None

    def _check(self) -> None:
        seen: dict[str, str] = {}
        for sae in self.saes:
            if not isinstance(sae, SparseAutoencoder):
                raise TypeError(
                    f"saes=[...] takes SAEs from mmlens.sae.load, got a {type(sae).__name__}"
                )
            for name in filter(None, (sae.cfg.hook_name, sae.cfg.hook_name_out)):
                if name not in self.model.hook_dict:
                    raise ValueError(
                        f"SAE {sae.cfg.source or ''} attaches at {name!r}: "
                        f"{self.model._unknown_hook_message(name)}"
                    )
            written = sae.cfg.hook_name_out or sae.cfg.hook_name
            if written in seen or sae.cfg.hook_name in seen:
                raise ValueError(
                    f"two SAEs replace {written!r}; splice one SAE per hook point at a time"
                )
            seen[written] = seen[sae.cfg.hook_name] = sae.cfg.hook_name

    def __enter__(self) -> Any:
        try:
            run_to_completion(self._attach)
            self.hook_scope = HookScope(self.model, self._splice_hooks() + self.fwd_hooks)
            self.hook_scope.__enter__()
        except BaseException:
            self._close()
            raise
        return self.model

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        scope, self.hook_scope = self.hook_scope, None
        try:
            if scope is not None:
                scope.__exit__(None, None, None)
        finally:
            run_to_completion(self._detach)

    def _attach(self) -> None:
        for full_name, point in self.points.items():
            point.name = full_name
            self.model.hook_dict[full_name] = point
            self.model.mod_dict[full_name] = point

    def _detach(self) -> None:
        remove_hooks(list(self.points.values()), lambda handle, hook_id: True)
        for full_name, point in self.points.items():
            self.model.hook_dict.pop(full_name, None)
            self.model.mod_dict.pop(full_name, None)
            point.name = full_name.rsplit(".", 1)[1]  # the SAE's own name for it

    def _splice_hooks(self) -> list[tuple[str, Callable]]:
        hooks: list[tuple[str, Callable]] = []
        for sae in self.saes:
            if sae.cfg.is_transcoder:
                hooks += _transcoder_hooks(sae, self.use_error_term)
            else:
                hooks.append((sae.cfg.hook_name, _sae_hook(sae, self.use_error_term)))
        return hooks


def _check_width(sae: SparseAutoencoder, tensor: Tensor, width: int, name: str) -> None:
    if tensor.shape[-1] != width:
        raise ValueError(
            f"SAE {sae.cfg.source or ''} expects width {width} at {name!r}, where this model's "
            f"activation is {tensor.shape[-1]} wide: it was trained for another model or hook"
        )


def _sae_hook(sae: SparseAutoencoder, use_error_term: bool) -> Callable:
    def splice_sae(activation: Tensor, hook: Any) -> Tensor:
        _check_width(sae, activation, sae.cfg.d_in, sae.cfg.hook_name)
        return sae(activation, use_error_term=use_error_term).to(activation.dtype)

    return splice_sae


def _transcoder_hooks(sae: SparseAutoencoder, use_error_term: bool) -> list:
    """Two hooks: one keeps the MLP's input, the other replaces the MLP's output."""
    inputs: list[Tensor] = []

    def keep_transcoder_input(activation: Tensor, hook: Any) -> None:
        _check_width(sae, activation, sae.cfg.d_in, sae.cfg.hook_name)
        inputs[:] = [activation]

    def splice_transcoder(activation: Tensor, hook: Any) -> Tensor:
        _check_width(sae, activation, sae.cfg.d_out, str(sae.cfg.hook_name_out))
        out = sae(inputs.pop(), use_error_term=use_error_term, target=activation)
        return out.to(activation.dtype)

    return [(sae.cfg.hook_name, keep_transcoder_input), (sae.cfg.hook_name_out, splice_transcoder)]
