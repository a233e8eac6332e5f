"""Hook bookkeeping that survives interrupts, and checks on what user hooks return.

TransformerLens records each hook in a list beside PyTorch's own hook dictionaries, one step
after registering it; a `KeyboardInterrupt` between the two steps (or half-way through a
clean-up loop) left hooks on the model that `reset_hooks()` could not see. Here PyTorch's
dictionaries are the truth: a scope notes the first hook id it may create
(`RemovableHandle.next_id`, which PyTorch increments for every hook) and, on exit, removes every
hook on the model's hook points with a later id that is not meant to outlive it. Clean-up is a
few dictionary deletions, repeated until done if an interrupt lands inside it (docs/hooks.md,
"Interrupts and errors").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch.utils.hooks import RemovableHandle
from transformer_lens.hook_points import HookPoint, LensHandle

Direction = Literal["fwd", "bwd", "both"]

# PyTorch keeps each hook's function in one of these dictionaries (by direction), and flags
# under the same id in the `_FLAG_DICTS` (`RemovableHandle.remove` deletes the id from all).
_HOOK_DICTS = {
    "fwd": ("_forward_hooks", "_forward_pre_hooks"),
    "bwd": ("_backward_hooks", "_backward_pre_hooks"),
}
_FLAG_DICTS = (
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)
_CLEAN_UP_TRIES = 5


def next_hook_id() -> int:
    """The id PyTorch will give the next hook registered anywhere (ids only grow)."""
    return RemovableHandle.next_id


def remove_hooks(
    points: Iterable[HookPoint],
    should_remove: Callable[[LensHandle | None, int], bool],
    direction: Direction = "both",
) -> None:
    """Remove every hook on `points` for which `should_remove(handle, hook_id)` holds.

    `handle` is the TransformerLens record of the hook, or None for a raw PyTorch hook (one
    that `run_with_cache` added, or one whose registration was interrupted before it was
    recorded). Records of removed hooks are dropped too. An interrupt or error inside the
    removal does not stop it: it is finished, then the first exception is raised again.
    """
    points = [point for point in points if _has_hook_or_record(point)]
    first_error: BaseException | None = None
    for _ in range(_CLEAN_UP_TRIES):
        try:
            for point in points:
                _remove_from_point(point, should_remove, direction)
            break
        except BaseException as error:  # noqa: BLE001 - finish the clean-up, then re-raise
            first_error = first_error or error
    if first_error is not None:
        raise first_error


def _remove_from_point(
    point: HookPoint,
    should_remove: Callable[[LensHandle | None, int], bool],
    direction: Direction,
) -> None:
    for side in ("fwd", "bwd"):
        if direction not in (side, "both"):
            continue
        handles = point.fwd_hooks if side == "fwd" else point.bwd_hooks
        by_id = {handle.hook.id: handle for handle in handles}
        hook_dicts = [getattr(point, name) for name in _HOOK_DICTS[side]]
        doomed = [
            hook_id
            for hook_dict in hook_dicts
            for hook_id in list(hook_dict)
            if should_remove(by_id.get(hook_id), hook_id)
        ]
        for hook_id in doomed:
            for hook_dict in hook_dicts + [getattr(point, name) for name in _FLAG_DICTS]:
                hook_dict.pop(hook_id, None)
        live = {hook_id for hook_dict in hook_dicts for hook_id in hook_dict}
        if any(handle.hook.id not in live for handle in handles):
            kept = [handle for handle in handles if handle.hook.id in live]
            if side == "fwd":
                point.fwd_hooks = kept
            else:
                point.bwd_hooks = kept


def _has_hook_or_record(point: HookPoint) -> bool:
    hook_dicts = [getattr(point, name) for side in _HOOK_DICTS.values() for name in side]
    return any(hook_dicts) or bool(point.fwd_hooks) or bool(point.bwd_hooks)


def has_any_hooks(points: Iterable[HookPoint]) -> bool:
    """Whether any PyTorch hook (recorded or raw) is on any of `points`."""
    return any(
        getattr(point, name) for point in points for name in ("_forward_hooks", "_backward_hooks")
    )


class CheckedHook:
    """A user hook as the model registers it: `fn(tensor, hook=hook)`, its return value
    checked against its input (see `check_result`).

    The hook the user passed stays reachable as `fn` (`original_hook`), so hooks that declare
    something about themselves by their type (`mmlens.ablations.LaterRowsHook`) are recognised
    behind the check; nothing is copied onto a wrapper.
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, tensor: Any, hook: HookPoint) -> Any:
        result = self.fn(tensor, hook=hook)
        if result is not None:
            check_result(result, tensor, hook, self.fn)
        return result

    def __repr__(self) -> str:  # cheap: TransformerLens names every hook by its repr
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        return f"<checked hook {name}>"


def checked_hook(fn: Callable[..., Any]) -> CheckedHook:
    """`fn` as a hook whose return value is checked against its input (see `check_result`)."""
    return CheckedHook(fn)


def original_hook(handle: LensHandle) -> Any:
    """The hook a user added, behind the model's `CheckedHook` (TransformerLens records the
    registered callable as `handle.user_hook`)."""
    hook = handle.user_hook
    return hook.fn if isinstance(hook, CheckedHook) else hook


def check_result(result: Any, tensor: Any, hook: HookPoint, fn: Callable[..., Any]) -> None:
    """A hook must return None or a tensor of its input's shape and dtype.

    A tensor that merely broadcasts (`[batch, 1, d_model]`, one head of a pattern) or has
    another dtype would otherwise flow on silently. `hook_prune` is the one hook point whose
    hooks return fewer positions (a subset of the sequence), so only its dtype is checked.
    """
    name = getattr(fn, "__qualname__", None) or repr(fn)
    where = f"hook {name} on {hook.name!r}"
    if not isinstance(result, torch.Tensor):
        raise TypeError(
            f"{where} returned a {type(result).__name__}; return None (to leave the activation "
            "as it is) or a tensor of the same shape and dtype"
        )
    if not isinstance(tensor, torch.Tensor):
        return
    same_shape = result.shape == tensor.shape or (hook.name or "").endswith("hook_prune")
    if not same_shape or result.dtype != tensor.dtype:
        raise ValueError(
            f"{where} returned a tensor of shape {tuple(result.shape)} and dtype {result.dtype} "
            f"for an activation of shape {tuple(tensor.shape)} and dtype {tensor.dtype}; "
            "return a tensor of the same shape and dtype (edit a copy, e.g. "
            "`out = tensor.clone(); out[...] = ...`, and cast with `.to(tensor.dtype)`)"
        )
