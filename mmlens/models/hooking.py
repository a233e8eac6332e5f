"""Hook bookkeeping of `HookedTransformer` (every mmlens model): adding, scoping and removing
hooks, hook-name checks, `run_with_cache` and `hook_names`, and SAEs spliced in (`saes`,
`run_with_saes`, `run_with_cache_with_saes`: `mmlens.sae`).

Every hook mmlens adds goes through these methods: names are checked (with suggestions), user
hooks' return values are checked (`mmlens.hooks.check_result`), and temporary hooks are removed
whatever interrupts the call (`mmlens.hooks`, docs/hooks.md).
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn
from transformer_lens import ActivationCache, HookedRootModule

from mmlens.config import MMConfig
from mmlens.hooks import (
    CacheSinks,
    HookPoint,
    HookScope,
    checked_hook,
    remove_hooks,
    run_to_completion,
    set_sink,
)
from mmlens.perf import enable_for_cpu_caching


class HookBookkeeping(HookedRootModule):
    """`transformer_lens.HookedRootModule` with mmlens's hook bookkeeping; `HookedTransformer`
    inherits it. The model provides `cfg` (its layer count names the valid layers) and `W_E`
    (where it computes)."""

    cfg: MMConfig
    W_E: torch.Tensor

    def _enable_hook_with_name(self, name: str, hook: Any, dir: Literal["fwd", "bwd"]) -> None:
        self._check_hook_name(name)
        super()._enable_hook_with_name(name, checked_hook(hook), dir)

    def _enable_hooks_for_points(
        self, hook_points: Any, enabled: Callable, hook: Callable, dir: Literal["fwd", "bwd"]
    ) -> None:
        super()._enable_hooks_for_points(hook_points, enabled, checked_hook(hook), dir)

    def add_hook(
        self,
        name: str | Callable[[str], bool],
        hook: Callable,
        dir: Literal["fwd", "bwd"] = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Add a hook that stays until `reset_hooks()` (TransformerLens' `add_hook`).

        Examples:
            >>> model.add_hook("blocks.0.hook_resid_post", lambda resid, hook: resid * 2)
            >>> torch.equal(model(inp), model(inp)), len(model.hook_dict["blocks.0.hook_resid_post"].fwd_hooks)
            (True, 1)
            >>> model.reset_hooks()
        """
        if isinstance(name, str):
            self._check_hook_name(name)
        super().add_hook(name, checked_hook(hook), dir, is_permanent, level, prepend)

    def _check_hook_name(self, name: str) -> None:
        if not isinstance(self.mod_dict.get(name), HookPoint):
            raise ValueError(self._unknown_hook_message(name))
        if (
            name.endswith("attn.hook_result")
            and not self.mod_dict[name.rsplit(".", 1)[0]].use_attn_result
        ):
            raise ValueError(
                f"{name} only runs with per-head results on: call "
                "model.set_use_attn_result(True) first (or use cache.stack_head_results, which "
                "computes them from hook_z)"
            )

    def hooks(
        self,
        fwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006 - TL's signature
        bwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> HookScope:
        """Add hooks for the duration of a `with` block (TransformerLens' `hooks()`).

        On exit, also after an exception or a `KeyboardInterrupt` at any moment (even while
        the hooks are being added or removed), every hook this block added is gone; hooks added
        with `add_hook` inside the block stay, as in TransformerLens.

        Examples:
            >>> from mmlens.ablations import zero_mlp
            >>> with model.hooks(fwd_hooks=zero_mlp(range(4))):
            ...     ablated = model(inp)
            >>> torch.equal(ablated, model(inp))     # the hooks are gone after the block
            False
        """
        return HookScope(
            self,
            fwd_hooks,
            bwd_hooks,
            reset_hooks_end=reset_hooks_end,
            clear_contexts=clear_contexts,
        )

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove hooks (TransformerLens' `reset_hooks`); with `level=None`, every hook on the
        model's hook points except permanent ones (unless `including_permanent`), raw PyTorch
        hooks included, and the context level goes back to 0.

        Examples:
            >>> model.reset_hooks()   # a clean model, whatever an interrupted cell left behind
        """

        def selected(handle: Any, hook_id: int) -> bool:
            if handle is None:
                return level is None
            if handle.is_permanent and not including_permanent:
                return False
            return level is None or handle.context_level == level

        def finish() -> None:
            if clear_contexts:
                self.clear_contexts()
            if level is None:
                self.context_level = 0
                for point in self.hook_points():  # a cache an interrupted cell left open
                    set_sink(point, None)
            self.is_caching = False

        run_to_completion(lambda: remove_hooks(self.hook_points(), selected, direction), finish)

    def _unknown_hook_message(self, name: str) -> str:
        for prefix, n_layers in self._layer_counts().items():
            match = re.match(rf"^{re.escape(prefix)}blocks\.(-?\d+)\.", name)
            if match and not 0 <= int(match.group(1)) < n_layers:
                return (
                    f"hook {name!r}: layer {match.group(1)} does not exist; "
                    f"'{prefix}blocks' has layers 0..{n_layers - 1}"
                )
        close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        return f"hook {name!r} does not exist in this model{hint} (see model.hook_dict)"

    def _layer_counts(self) -> dict[str, int]:
        """Layers of each stack of blocks, by hook-name prefix (models with a vision tower or a
        Q-Former add theirs), for the message about a layer that does not exist."""
        return {"": self.cfg.n_layers}

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: str | list[str] | Callable[[str], bool] | None = None,
        device: str | torch.device | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        **model_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Run and return `(output, cache)`; the cache is a `transformer_lens.ActivationCache`.

        Args:
            names_filter: a hook name, a list of names, or a predicate on names (default: all).
            device: where cached tensors go (default: where they are computed).
            remove_batch_dim: drop the batch axis (batch of 1 only).
            incl_bwd: also cache gradients (`name + "_grad"`); the output must be a scalar
                (e.g. `return_type="loss"`), as in TransformerLens.

        A hook point with no hook on it hands its activation to the cache directly (its cache
        sink, `mmlens.hooks.HookPoint`); one with hooks gets a plain PyTorch forward hook added
        after them (so the cache holds edited values). Both are removed whatever interrupts the
        call. Neither goes through TransformerLens' per-hook bookkeeping, whose cost dominated a
        full cache of a large model on a GPU (`bench/forward.py`); on a small model, PyTorch's
        own hooks did (`bench/cache.py`). On the CPU, the first call makes glibc
        keep freed memory for reuse (`mmlens.perf`; opt out with MMLENS_KEEP_FREED_MEMORY=0):
        a full cache allocates hundreds of MB per call, and re-faulting it cost ~40%.

        Examples:
            >>> logits, cache = model.run_with_cache(inp, names_filter=lambda n: "resid" in n)
            >>> cache.accumulated_resid(apply_ln=True).shape  # [n_layers + 1, batch, pos, d_model]
            torch.Size([7, 1, 105, 128])
        """
        if incl_bwd:
            output, cache_dict = super().run_with_cache(
                *model_args,
                names_filter=names_filter,
                device=device,
                remove_batch_dim=remove_batch_dim,
                incl_bwd=True,
                **model_kwargs,
            )
            return output, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

        if self.W_E.device.type == "cpu":
            enable_for_cpu_caching()
        cache_dict: dict[str, torch.Tensor] = {}

        def store(name: str, activation: torch.Tensor) -> None:
            stored = activation.detach().to(device)
            cache_dict[name] = stored[0] if remove_batch_dim else stored

        def save(hook_point: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            store(hook_point.name, output)

        # Points without hooks hand their activation to a sink (no PyTorch hook to register,
        # call and remove); a point with hooks gets a caching hook after them.
        points = [self.hook_dict[name] for name in self.hook_names(names_filter)]
        hooked = [point for point in points if point._forward_hooks]
        plain = [point for point in points if not point._forward_hooks]
        # (no scope to scan the model's points for hooks to remove when none were added)
        with HookScope(self) if hooked else contextlib.nullcontext(), CacheSinks(plain, store):
            for point in hooked:
                point.register_forward_hook(save)
            output = self(*model_args, **model_kwargs)
        if remove_batch_dim and output is not None and output.shape[0] != 1:
            raise ValueError("remove_batch_dim=True needs a batch of 1")
        return output, ActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim)

    def saes(
        self,
        saes: Any,
        use_error_term: bool = False,
        fwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006 - as hooks()
    ) -> Any:
        """Splice SAEs (`mmlens.sae.load`) into the model for a `with` block: each one's hook
        point carries its reconstruction (plus its error with `use_error_term`), and its hook
        points are ``{hook_name}.hook_sae_acts_post`` etc. (`mmlens.sae.SAEScope`); `fwd_hooks`
        join them for the block, hooks on the SAE's points included.

        Examples:
            >>> sae = mmlens.sae.load("tiny-shapes-sae")
            >>> with model.saes([sae], use_error_term=True):
            ...     spliced = model(inp)
            >>> torch.allclose(spliced, model(inp), atol=1e-4)   # the error term keeps the logits
            True
        """
        from mmlens.sae import SAEScope

        return SAEScope(self, saes, use_error_term=use_error_term, fwd_hooks=fwd_hooks)

    def run_with_saes(
        self,
        *model_args: Any,
        saes: Any,
        use_error_term: bool = False,
        fwd_hooks: list[tuple[str | Callable, Callable]] = [],  # noqa: B006 - as hooks()
        **model_kwargs: Any,
    ) -> Any:
        """Run with SAEs spliced in (SAELens' `run_with_saes`); `fwd_hooks` run with them, e.g.
        on a feature: ``("blocks.2.hook_resid_post.hook_sae_acts_post", zero_feature)``.

        Examples:
            >>> sae = mmlens.sae.load("tiny-shapes-sae")
            >>> def zero_features(acts, hook):
            ...     return torch.zeros_like(acts)
            >>> logits = model.run_with_saes(inp, saes=[sae], fwd_hooks=[
            ...     ("blocks.2.hook_resid_post.hook_sae_acts_post", zero_features)])
            >>> logits.shape
            torch.Size([1, 105, 70])
        """
        with self.saes(saes, use_error_term=use_error_term, fwd_hooks=fwd_hooks):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self, *model_args: Any, saes: Any, use_error_term: bool = False, **kwargs: Any
    ) -> tuple[Any, ActivationCache]:
        """`run_with_cache` with SAEs spliced in; the cache holds their hook points as
        ``{hook_name}.hook_sae_input``, ``.hook_sae_acts_pre``, ``.hook_sae_acts_post``,
        ``.hook_sae_recons``, ``.hook_sae_error`` (with `use_error_term`), ``.hook_sae_output``.

        Examples:
            >>> sae = mmlens.sae.load("tiny-shapes-sae")
            >>> _, cache = model.run_with_cache_with_saes(inp, saes=[sae])
            >>> cache["blocks.2.hook_resid_post.hook_sae_acts_post"].shape  # [batch, pos, d_sae]
            torch.Size([1, 105, 256])
        """
        with self.saes(saes, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)

    def hook_names(
        self, names_filter: str | list[str] | Callable[[str], bool] | None = None
    ) -> list[str]:
        """Hook point names selected by a name, a list of names or a predicate (None: all).

        Names that do not exist raise a ValueError that says what does.
        """
        if names_filter is None:
            return list(self.hook_dict)
        if callable(names_filter):
            return [name for name in self.hook_dict if names_filter(name)]
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        for name in names:
            self._check_hook_name(name)
        return names
