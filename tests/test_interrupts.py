"""A KeyboardInterrupt (or any exception) at any moment of a call never leaves a hook behind.

Deterministic version of "Ctrl-C at a random time": every function that adds or removes hooks
is patched to raise `KeyboardInterrupt` at its k-th call, before or after doing its work, for
every k over a whole call. After each interrupted call the model must have no hook at all, be
back at context level 0, and give bit-identical logits to a clean forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

import mmlens
import mmlens.hooks
from mmlens.ablations import attention_knockout, drop_tokens, window, zero_mlp
from mmlens.analysis import (
    answer_probability,
    attention_share,
    cliff_layer,
    knockout_sweep,
    llava_cam,
    logit_lens,
    module_knockout_jaccard,
)
from mmlens.patching import edge_attribution_patching, faithfulness
from mmlens.testing import make_test_image

N_LAYERS = 3
# (owner, attribute): every function through which a hook is added to or removed from a model.
PATCHED = [
    (nn.Module, "register_forward_hook"),
    (nn.Module, "register_forward_pre_hook"),
    (nn.Module, "register_full_backward_hook"),
    (HookPoint, "add_hook"),
    (torch.utils.hooks.RemovableHandle, "remove"),
    (mmlens.hooks, "_remove_from_point"),
    (mmlens.hooks, "set_sink"),  # run_with_cache's cache sinks, set and cleared point by point
]


class Interrupt:
    """Counts calls of the patched functions; raises KeyboardInterrupt at call `at` (1-based),
    before the real function runs (`after=False`) or after it returned (`after=True`)."""

    def __init__(self, at: int | None = None, after: bool = False):
        self.at, self.after, self.calls = at, after, 0

    def wrap(self, real: Callable) -> Callable:
        def patched(*args, **kwargs):
            self.calls += 1
            hit = self.calls == self.at
            if hit and not self.after:
                raise KeyboardInterrupt(f"call {self.calls}")
            result = real(*args, **kwargs)
            if hit:
                raise KeyboardInterrupt(f"after call {self.calls}")
            return result

        return patched


@contextmanager
def patched(interrupt: Interrupt) -> Iterator[Interrupt]:
    originals = [(owner, name, getattr(owner, name)) for owner, name in PATCHED]
    try:
        for owner, name, real in originals:
            setattr(owner, name, interrupt.wrap(real))
        yield interrupt
    finally:
        for owner, name, real in originals:
            setattr(owner, name, real)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint(n_layers=N_LAYERS))


@pytest.fixture(scope="module")
def inp(model):
    return model.prepare(make_test_image(56, 56, 3), "What colour is the square?")


@pytest.fixture(scope="module")
def clean_logits(model, inp):
    with torch.no_grad():
        return model(inp)


def assert_clean(model, inp, clean_logits, context: str) -> None:
    for name, point in model.hook_dict.items():
        for attribute in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            assert not getattr(point, attribute), f"{context}: {attribute} left on {name}"
        assert not point.fwd_hooks and not point.bwd_hooks, f"{context}: records left on {name}"
        assert point.sink is None, f"{context}: a cache sink left on {name}"
    for name, module in model.named_modules():  # raw hooks on modules that are not hook points
        for attribute in ("_forward_hooks", "_forward_pre_hooks"):
            assert not getattr(module, attribute), f"{context}: {attribute} left on {name}"
    assert model.context_level == 0, f"{context}: context level {model.context_level}"
    with torch.no_grad():
        assert torch.equal(model(inp), clean_logits), f"{context}: logits changed"


def calls(model, inp) -> dict[str, Callable[[], object]]:
    image, last = inp.positions("image"), inp.positions("last")
    knockout = attention_knockout(image, last, window(1, 3, N_LAYERS)) + zero_mlp(0)

    def in_hooks_block():
        with model.hooks(fwd_hooks=knockout):
            return model(inp)

    def edge_circuit():  # exact edge patching: hooks on hook points and on modules
        other = model.prepare(make_test_image(56, 56, 7), "What colour is the square?")
        top = model(inp)[0, -1].argsort(descending=True)[:2].tolist()

        def metric(logits):
            return logits[:, -1, top[0]] - logits[:, -1, top[1]]

        edges = edge_attribution_patching(model, inp, other, metric, method="eap")
        return faithfulness(model, inp, other, metric, edges, sizes=[5])

    def generate_with_hooks():
        with model.hooks(fwd_hooks=drop_tokens(image, 1)):
            return model.generate(inp, max_new_tokens=2)

    return {
        "run_with_hooks": lambda: model.run_with_hooks(inp, fwd_hooks=knockout),
        "run_with_cache": lambda: model.run_with_cache(inp),
        "run_with_cache(incl_bwd)": lambda: model.run_with_cache(
            inp,
            names_filter=lambda name: name.endswith("hook_resid_post"),
            incl_bwd=True,
            return_type="loss",
        ),
        "hooks()": in_hooks_block,
        "generate": generate_with_hooks,
        "knockout_sweep(engine)": lambda: knockout_sweep(model, inp, progress=False),
        "knockout_sweep(naive)": lambda: knockout_sweep(
            model, inp, method="naive", centres=[1], progress=False
        ),
        "answer_probability": lambda: answer_probability(model, inp, fwd_hooks=knockout),
        "logit_lens": lambda: logit_lens(model, inp, [0, 1]),
        "attention_share": lambda: attention_share(model, inp),
        "module_knockout_jaccard": lambda: module_knockout_jaccard(model, inp, progress=False),
        "cliff_layer": lambda: cliff_layer(model, inp, ["red"], progress=False),
        "llava_cam": lambda: llava_cam(model, inp, "red", n_samples=1, progress=False),
        "edge attribution and faithfulness": edge_circuit,
    }


CALLS = [
    "run_with_hooks",
    "run_with_cache",
    "run_with_cache(incl_bwd)",
    "hooks()",
    "generate",
    "knockout_sweep(engine)",
    "knockout_sweep(naive)",
    "answer_probability",
    "logit_lens",
    "attention_share",
    "module_knockout_jaccard",
    "cliff_layer",
    "llava_cam",
    "edge attribution and faithfulness",
]


@pytest.mark.parametrize("call", CALLS)
def test_an_interrupt_at_any_hook_operation_leaves_no_hook(model, inp, clean_logits, call):
    run = calls(model, inp)[call]
    with patched(Interrupt()) as counter:
        run()
    n_calls = counter.calls
    assert n_calls > 0, "the call adds no hook: nothing to interrupt"
    assert_clean(model, inp, clean_logits, f"{call} uninterrupted")
    for at in range(1, n_calls + 1):
        for after in (False, True):
            with pytest.raises(KeyboardInterrupt), patched(Interrupt(at, after)):
                run()
            assert_clean(model, inp, clean_logits, f"{call}, interrupt {at}/{n_calls} {after=}")


def test_an_error_inside_a_hook_leaves_no_hook(model, inp, clean_logits):
    def broken(scores, hook):
        raise RuntimeError("bug in a user hook")

    with pytest.raises(RuntimeError, match="bug in a user hook"):
        model.run_with_hooks(inp, fwd_hooks=[("blocks.1.attn.hook_attn_scores", broken)])
    with pytest.raises(RuntimeError, match="bug in a user hook"):
        _cache_with_broken_hook(model, inp)
    assert_clean(model, inp, clean_logits, "after a failing hook")


def _cache_with_broken_hook(model, inp):
    with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", _raise)]):
        return model.run_with_cache(inp)


def _raise(tensor, hook):
    raise RuntimeError("bug in a user hook")


def test_reset_hooks_removes_raw_hooks_and_resets_the_level(model, inp, clean_logits):
    point = model.hook_dict["blocks.0.hook_resid_post"]
    point.register_forward_hook(lambda module, args, out: out * 0)  # raw, unrecorded
    model.add_hook("blocks.1.hook_mlp_out", lambda out, hook: out * 2)
    model.context_level = 5  # as an interrupted TransformerLens `hooks()` could leave it
    model.reset_hooks()
    assert_clean(model, inp, clean_logits, "after reset_hooks")


def test_permanent_hooks_survive_reset_unless_asked(model, inp, clean_logits):
    model.add_perma_hook("blocks.0.hook_mlp_out", lambda out, hook: out * 0)
    with model.hooks(fwd_hooks=zero_mlp(1)):
        pass
    model.reset_hooks()
    assert model.hook_dict["blocks.0.hook_mlp_out"]._forward_hooks, "permanent hook removed"
    with torch.no_grad():
        assert not torch.equal(model(inp), clean_logits)
    model.reset_hooks(including_permanent=True)
    assert_clean(model, inp, clean_logits, "after reset_hooks(including_permanent=True)")


def test_add_hook_inside_a_hooks_block_stays_as_in_transformer_lens(model, inp, clean_logits):
    with model.hooks(fwd_hooks=zero_mlp(1)):
        model.add_hook("blocks.0.hook_mlp_out", lambda out, hook: out * 0)
    assert len(model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks) == 1
    assert not model.hook_dict["blocks.1.hook_mlp_out"].fwd_hooks
    model.reset_hooks()
    assert_clean(model, inp, clean_logits, "after reset_hooks")


@pytest.mark.parametrize("at", [1, 2, 7])
def test_an_interrupt_in_the_clean_up_pre_filter_leaves_no_hook(model, inp, clean_logits, at):
    """The choice of hook points to clean (the pre-filter) is part of the protected step."""
    image, last = inp.positions("image"), inp.positions("last")
    knockout = attention_knockout(image, last, window(1, 3, N_LAYERS))
    real = mmlens.hooks._has_hook_or_record
    interrupt = Interrupt(at)
    try:
        mmlens.hooks._has_hook_or_record = interrupt.wrap(real)
        with pytest.raises(KeyboardInterrupt, match=f"call {at}"):
            model.run_with_hooks(inp, fwd_hooks=knockout)
    finally:
        mmlens.hooks._has_hook_or_record = real
    assert_clean(model, inp, clean_logits, f"pre-filter interrupted at call {at}")


def test_ctrl_c_at_random_moments_leaves_no_hook(model, inp, clean_logits):
    """Real SIGINTs (Ctrl-C), sent by a timer thread at random moments of `run_with_hooks`: the
    interrupt lands anywhere, registration and clean-up included."""
    import os
    import random
    import signal
    import sys
    import threading
    import time

    image, last = inp.positions("image"), inp.positions("last")
    knockout = attention_knockout(image, last, window(1, 3, N_LAYERS)) + zero_mlp(0)
    generator = random.Random(0)
    start = time.perf_counter()
    for _ in range(5):
        model.run_with_hooks(inp, fwd_hooks=knockout)
    duration = (time.perf_counter() - start) / 5
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the timer thread gets the GIL within microseconds
    interrupted, grad_enabled = 0, torch.is_grad_enabled()
    try:
        for trial in range(400):
            timer = threading.Timer(
                generator.uniform(0, duration), os.kill, (os.getpid(), signal.SIGINT)
            )
            try:
                timer.start()
                try:
                    model.run_with_hooks(inp, fwd_hooks=knockout)
                finally:
                    timer.join()  # the signal is sent ...
                time.sleep(1e-3)  # ... and, if it came after the call, delivered here
            except KeyboardInterrupt:
                interrupted += 1
            # An interrupt inside PyTorch's own grad-mode context managers (not mmlens state)
            # can leave gradients off; later tests need them.
            torch.set_grad_enabled(grad_enabled)
            for point in model.hook_dict.values():
                assert not point._forward_hooks and not point.fwd_hooks, f"trial {trial}"
            assert model.context_level == 0, f"trial {trial}"
    finally:
        sys.setswitchinterval(interval)
        torch.set_grad_enabled(grad_enabled)
    assert interrupted == 400
    assert_clean(model, inp, clean_logits, "after 400 random Ctrl-Cs")
