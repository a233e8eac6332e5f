"""A model on two devices (GPU and CPU) against the same model on one, where a GPU is lent.

Loads a LLaVA-1.5-shaped random checkpoint once on the GPU and once with a device map that puts
the vision tower, projector, embedding and the first half of the blocks on the GPU and the rest
on the CPU; checks logits, greedy generation, a knockout sweep, and that hooks see tensors on
their own block's device. Then runs the `knockout` experiment through the runner on the GPU and
on the CPU and compares the rows. Last, InstructBLIP with its vision tower, Q-Former and
embedding on the GPU and the language projection and decoder on the CPU. Prints each check with
its measured difference.

    python bench/devices.py [--n-layers 8]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from timing import LLAVA_15_SHAPE

import mmlens
from mmlens.analysis import PAPER_FLOWS, knockout_sweep
from mmlens.data import load
from mmlens.testing import build_tiny_instructblip, build_tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-layers", type=int, default=8)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench/devices.py needs a GPU (the CPU-only checks are tests/test_placement.py)"
        )
    folder = tempfile.mkdtemp()
    build_tiny_llava(folder, **{**LLAVA_15_SHAPE, "n_layers": args.n_layers})
    half = args.n_layers // 2
    device_map = {"vision": "cuda:0", "projector": "cuda:0", "embed": "cuda:0"}
    device_map |= {
        f"blocks.{layer}": "cuda:0" if layer < half else "cpu" for layer in range(args.n_layers)
    }
    device_map |= {"ln_final": "cpu", "unembed": "cpu"}
    single = mmlens.from_pretrained(folder, device="cuda")
    split = mmlens.from_pretrained(folder, device_map=device_map)
    samples = load("shapes:4")
    inp = single.prepare([s.load_image() for s in samples], [s.question for s in samples])
    with torch.no_grad():
        difference = (single(inp).cpu() - split(inp).cpu()).abs().max().item()
        same_tokens = torch.equal(
            single.generate(inp, max_new_tokens=6).cpu(),
            split.generate(inp, max_new_tokens=6).cpu(),
        )
    print(f"logits, GPU vs GPU+CPU split: max |difference| {difference:.2e} (fp32)")
    print(f"greedy generation identical: {same_tokens}")
    seen = {}

    def record(tensor, hook):
        seen[hook.name] = tensor.device.type

    names = [f"blocks.{layer}.hook_resid_post" for layer in (0, half - 1, half, args.n_layers - 1)]
    split.run_with_hooks(inp, fwd_hooks=[(name, record) for name in names])
    print(f"hooks see their block's device: {seen}")
    one = single.prepare(samples[0].load_image(), samples[0].question)
    sweeps = [
        knockout_sweep(model, one, PAPER_FLOWS, 3, progress=False).relative_change
        for model in (single, split)
    ]
    print(
        f"knockout sweep, GPU vs split: max |difference| {(sweeps[0] - sweeps[1]).abs().max():.2e} pp"
    )
    with tempfile.TemporaryDirectory() as out:
        on_gpu = mmlens.run(
            "knockout", single, samples, f"{out}/gpu", window_size=3, progress=False
        )
        cpu_model = mmlens.from_pretrained(folder, device="cpu")
        on_cpu = mmlens.run(
            "knockout", cpu_model, samples, f"{out}/cpu", window_size=3, progress=False
        )
    runner_difference = (on_gpu.relative_change - on_cpu.relative_change).abs().max()
    print(
        f"runner knockout rows, GPU vs CPU: {len(on_gpu)} rows, max |difference| {runner_difference:.2e} pp"
    )
    instructblip_split(samples)


def instructblip_split(samples) -> None:
    """InstructBLIP with its vision tower and Q-Former on the GPU, the language projection,
    the decoder and the unembedding on the CPU, against the same model on the GPU."""
    folder = build_tiny_instructblip(tempfile.mkdtemp())
    on_gpu = ("vision", "qformer", "embed")
    device_map = {"": "cpu", **{name: "cuda:0" for name in on_gpu}}
    single = mmlens.from_pretrained(folder, device="cuda")
    split = mmlens.from_pretrained(folder, device_map=device_map)
    inp = single.prepare([s.load_image() for s in samples], [s.question for s in samples])
    with torch.no_grad():
        difference = (single(inp).cpu() - split(inp).cpu()).abs().max().item()
        same = torch.equal(
            single.generate(inp, max_new_tokens=6).cpu(),
            split.generate(inp, max_new_tokens=6).cpu(),
        )
    print(
        f"InstructBLIP, GPU vs {'+'.join(on_gpu)} on the GPU and the rest on the CPU: logits max "
        f"|difference| {difference:.2e} (fp32); greedy generation identical: {same}"
    )


if __name__ == "__main__":
    main()
