"""Hook bookkeeping that survives interrupts, and checks on what user hooks return.

TransformerLens records each hook in a list beside PyTorch's own hook dictionaries, one step
after registering it; a `KeyboardInterrupt` between the two steps (or half-way through a
clean-up loop) left hooks on the model that `reset_hooks()` could not see. Here PyTorch's
dictionaries are the truth: a scope notes the first hook id it may create
(`RemovableHandle.next_id`, which PyTorch increments for every hook) and, on exit, removes every
hook on the model's hook points with a later id that is not meant to outlive it. Clean-up is a
few dictionary deletions, repeated until done if an interrupt lands inside it. A scope
(`HookScope`) is a class, not a generator, so that no interrupt can land between its steps and
the `with` statement; while one is open, a Ctrl-C (SIGINT) that lands in this module's
bookkeeping is held back until the hooks and the context level are settled, then raised
(docs/hooks.md, "Interrupts and errors").
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch.utils.hooks import RemovableHandle
from transformer_lens.hook_points import HookPoint as LensHookPoint
from transformer_lens.hook_points import LensHandle


class HookPoint(LensHookPoint):
    """TransformerLens' hook point, plus a cache sink: while `sink` is set, each call hands its
    activation to `sink(name, activation)` without a PyTorch hook. `run_with_cache` uses it
    for the points no hook is on (registering, calling and removing a PyTorch hook on each of a
    model's hundreds of points cost more than the forward pass itself on a small model; a point
    with hooks keeps a caching hook after them, so that the cache holds edited values).
    `CacheSinks` sets and clears sinks whatever interrupts it."""

    sink: Callable[[str, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sink is not None:
            self.sink(self.name, x)
        return x


class _ProtectedScope:
    """A `with` block whose entry (`_open`) and exit (`_shut`) are each one protected step, as
    `HookScope`'s: a Ctrl-C inside either is held back until it is done, and an error or
    interrupt in `_open` runs `_shut` before it is raised."""

    def _open(self) -> None:
        raise NotImplementedError

    def _shut(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> _ProtectedScope:
        self.held = _hold_interrupts()
        try:
            self._open()
            if _SIGINT["pending"]:  # Ctrl-C while opening: shut, then raise it
                _SIGINT["pending"] = False
                _deliver(signal.SIGINT, None)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        try:
            run_to_completion(self._shut)
        finally:
            held, self.held = self.held, False
            _release_interrupts(held)


class CacheSinks(_ProtectedScope):
    """`sink` on each of `points` for the length of a `with` block; every one cleared on exit,
    also after an error or an interrupt at any moment."""

    def __init__(self, points: Iterable[HookPoint], sink: Callable[[str, torch.Tensor], None]):
        self.points, self.sink = list(points), sink

    def _open(self) -> None:
        for point in self.points:
            set_sink(point, self.sink)

    def _shut(self) -> None:
        for point in self.points:
            set_sink(point, None)


class ModuleHooks(_ProtectedScope):
    """Forward pre-hooks on modules that are not hook points (the arguments of an attention
    call, a norm's input) for the length of a `with` block: `pre_hooks` holds ``(module, hook,
    with_kwargs)``. On exit, also after an error or an interrupt at any moment, every pre-hook
    registered on those modules since entry is gone: found by PyTorch's hook ids, as
    `HookScope` finds its hooks, so also one whose registration was interrupted before its
    handle came back."""

    def __init__(self, pre_hooks: Iterable[tuple[torch.nn.Module, Callable, bool]]):
        self.pre_hooks, self.first_id = list(pre_hooks), None

    def _open(self) -> None:
        self.first_id = next_hook_id()
        for module, hook, with_kwargs in self.pre_hooks:
            module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)

    def _shut(self) -> None:
        if self.first_id is None:
            return
        for module, _, _ in self.pre_hooks:
            for hook_id in [hook_id for hook_id in module._forward_pre_hooks
                            if hook_id >= self.first_id]:  # fmt: skip
                module._forward_pre_hooks.pop(hook_id, None)
                module._forward_pre_hooks_with_kwargs.pop(hook_id, None)


def set_sink(point: HookPoint, sink: Callable[[str, torch.Tensor], None] | None) -> None:
    """Set (or with None, clear) `point`'s cache sink, past nn.Module's `__setattr__` (about
    5 µs a call, and a full cache sets and clears hundreds)."""
    object.__setattr__(point, "sink", sink)


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


# Ctrl-C while hooks are added or removed (docs/hooks.md, "Interrupts and errors"): while a hook
# scope is open, SIGINT goes to `_on_sigint`, which holds it back if it lands in this module's
# bookkeeping (scope entry and exit, clean-up) and delivers it as usual anywhere else (a forward
# pass, a user's hook). A held interrupt is raised once the bookkeeping is settled.
_SIGINT: dict[str, Any] = {"depth": 0, "previous": None, "pending": False}
_NOT_BOOKKEEPING = {"__call__", "check_result", "__repr__", "checked_hook", "original_hook"}


def _on_sigint(signum: int, frame: Any) -> None:
    # The innermost frame of this module on the stack says whether the interrupt landed in the
    # bookkeeping (or in what it calls: TransformerLens, PyTorch, the signal module) or in a
    # user's hook run by `CheckedHook`; a forward pass has no frame of this module above it.
    while frame is not None and frame.f_code.co_filename != __file__:
        frame = frame.f_back
    if frame is not None and frame.f_code.co_name not in _NOT_BOOKKEEPING:
        _SIGINT["pending"] = True
        return
    _deliver(signum, frame)


def _deliver(signum: int, frame: Any) -> None:
    previous = _SIGINT["previous"]
    if callable(previous) and previous is not _on_sigint:
        previous(signum, frame)  # Python's default handler raises KeyboardInterrupt
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt


def _hold_interrupts() -> bool:
    """Route SIGINT through `_on_sigint` (nested scopes count); False where signals cannot be
    handled here (another thread) or SIGINT has no Python handler (ignored, the system's
    default, or set from C): then nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if _SIGINT["depth"] == 0:
        if not callable(signal.getsignal(signal.SIGINT)):  # SIG_IGN, SIG_DFL or not from Python
            return False
        _SIGINT["previous"] = signal.signal(signal.SIGINT, _on_sigint)
    _SIGINT["depth"] += 1
    return True


def _release_interrupts(held: bool) -> None:
    """Undo one `_hold_interrupts`; then raise a Ctrl-C that was held back, if any."""
    if held:
        _SIGINT["depth"] -= 1
        if _SIGINT["depth"] == 0 and signal.getsignal(signal.SIGINT) is _on_sigint:
            signal.signal(signal.SIGINT, _SIGINT["previous"])
    if _SIGINT["pending"]:
        _SIGINT["pending"] = False
        _deliver(signal.SIGINT, None)


def run_to_completion(*steps: Callable[[], Any]) -> None:
    """Run every step, each retried (up to a few times) if an interrupt or error lands inside
    it, with Ctrl-C held back until all are done; then raise the first exception, if any.
    Hook clean-up and restoring the context level are one such protected step."""
    first_error: BaseException | None = None
    held = _hold_interrupts()
    try:
        for step in steps:
            for _ in range(_CLEAN_UP_TRIES):
                try:
                    step()
                    break
                except BaseException as error:  # noqa: BLE001 - finish the clean-up, then re-raise
                    first_error = first_error or error
    finally:
        try:
            _release_interrupts(held)
        except BaseException as error:  # noqa: BLE001 - a held Ctrl-C, raised after the first error
            first_error = first_error or error
    if first_error is not None:
        raise first_error


class HookScope:
    """A context level of `model` as a `with` block: entering adds `fwd_hooks` and `bwd_hooks`;
    leaving removes every hook added since entry at this level (or not recorded at all, unless
    `keep_untracked`) and restores the level. Entry and exit are each one protected step: an
    interrupt or error at any moment of either leaves no hook behind (docs/hooks.md).

    Examples:
        >>> double = [("blocks.0.hook_resid_post", lambda resid, hook: resid * 2)]
        >>> with HookScope(model, fwd_hooks=double):
        ...     doubled = model(inp)
        >>> torch.equal(doubled, model(inp))              # the hook is gone after the block
        False
    """

    def __init__(
        self,
        model: Any,
        fwd_hooks: Iterable[tuple[Any, Callable]] = (),
        bwd_hooks: Iterable[tuple[Any, Callable]] = (),
        *,
        reset_hooks_end: bool = True,
        keep_untracked: bool = False,
        clear_contexts: bool = False,
    ):
        self.model, self.fwd_hooks, self.bwd_hooks = model, list(fwd_hooks), list(bwd_hooks)
        self.reset_hooks_end, self.keep_untracked = reset_hooks_end, keep_untracked
        self.clear_contexts = clear_contexts

    def __enter__(self) -> Any:
        model = self.model
        self.outer_level, self.first_id = model.context_level, next_hook_id()
        self.level = [self.outer_level + 1]
        self.held = _hold_interrupts()
        try:
            model.context_level = self.level[0]
            for name, hook in self.fwd_hooks:
                model._enable_hook(name=name, hook=hook, dir="fwd")
            for name, hook in self.bwd_hooks:
                model._enable_hook(name=name, hook=hook, dir="bwd")
            if not self.reset_hooks_end:
                self.level.clear()  # the caller removes them (backward hooks for a later backward)
            if _SIGINT["pending"]:  # Ctrl-C during registration: clean up, then raise it
                _SIGINT["pending"] = False
                _deliver(signal.SIGINT, None)
        except BaseException:
            self._close()
            raise
        return model

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        try:
            run_to_completion(self._remove_added, self._restore_level)
        finally:
            held, self.held = self.held, False
            _release_interrupts(held)

    def _remove_added(self) -> None:
        if not self.level:
            return
        level, first_id, keep_untracked = self.level[0], self.first_id, self.keep_untracked

        def added_here(handle: LensHandle | None, hook_id: int) -> bool:
            if hook_id < first_id:
                return False
            if handle is None:
                return not keep_untracked
            return handle.context_level == level and not handle.is_permanent

        remove_hooks(self.model.hook_points(), added_here)
        if self.clear_contexts:
            self.model.clear_contexts()

    def _restore_level(self) -> None:
        self.model.context_level = self.outer_level


def remove_hooks(
    points: Iterable[HookPoint],
    should_remove: Callable[[LensHandle | None, int], bool],
    direction: Direction = "both",
) -> None:
    """Remove every hook on `points` for which `should_remove(handle, hook_id)` holds.

    `handle` is the TransformerLens record of the hook, or None for a raw PyTorch hook (one
    that `run_with_cache` added, or one whose registration was interrupted before it was
    recorded). Records of removed hooks are dropped too. The whole removal, the choice of
    points included, is one protected step (`run_to_completion`): an interrupt or error inside
    it does not stop it; it is finished, then the first exception is raised again. `points`
    must be iterable more than once (a list, or `hook_dict.values()`).
    """

    def remove() -> None:
        for point in [point for point in points if _has_hook_or_record(point)]:
            _remove_from_point(point, should_remove, direction)

    run_to_completion(remove)


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
    """Whether any PyTorch hook (recorded or raw) or cache sink is on any of `points`."""
    return any(
        getattr(point, name, None)
        for point in points
        for name in ("_forward_hooks", "_backward_hooks", "sink")
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
