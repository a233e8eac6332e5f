"""The `knockout` experiment through the runner vs the papers' per-sample loop, side by side.

Both measure the Cross-modal paper's four flows (Figures 3-4) over every window centre on the
same samples of `mmlens.zoo.shapes` with the shipped `tiny-shapes` model (or, with
`--llava-shaped`, a LLaVA-1.5-shaped random checkpoint: 576 image tokens): the runner
(`mmlens.run("knockout", ...)`: batched, prefix-reusing engine, results streamed to Parquet
with a manifest) against a plain Python loop as the papers' code runs it (batch size 1, one
full forward per sample, flow and centre, results kept in memory). Prints samples/s of both and
checks that they agree.

    python bench/experiment.py [--samples 64] [--batch-size 16] [--device cuda] [--llava-shaped]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from timing import bench_model

import mmlens
from mmlens.ablations import attention_knockout, window
from mmlens.analysis import PAPER_FLOWS
from mmlens.data import load


def papers_loop(model, samples, window_size: int) -> list[float]:
    """Relative changes, as the papers' scripts compute them: one forward per (sample, flow,
    centre), batch size 1."""
    n_layers = model.cfg.n_layers
    changes = []
    for sample in samples:
        inp = model.prepare(sample.load_image(), sample.question)
        with torch.no_grad():
            base = model(inp)[0, -1].float().softmax(-1)
            answer = int(base.argmax())
            for source, target in PAPER_FLOWS.values():
                for centre in range(n_layers):
                    hooks = attention_knockout(
                        inp.positions(source),
                        inp.positions(target),
                        window(centre, window_size, n_layers),
                    )
                    logits = model.run_with_hooks(inp, fwd_hooks=hooks)[0, -1].float()
                    p_new = logits.softmax(-1)[answer]
                    changes.append(float((p_new - base[answer]) / base[answer] * 100))
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--window-size", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llava-shaped", action="store_true")
    args = parser.parse_args()

    model = bench_model(args.llava_shaped, args.device)
    data = load(f"shapes:{args.samples}")
    print(
        f"device={args.device} model={model.cfg.model_name} layers={model.cfg.n_layers} "
        f"samples={len(data)} flows={list(PAPER_FLOWS)} window={args.window_size} "
        f"batch_size={args.batch_size} threads={torch.get_num_threads()}"
    )
    papers_loop(model, data[:2], args.window_size)  # warm-up
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = mmlens.run(
            "knockout", model, data, out, batch_size=args.batch_size,
            window_size=args.window_size, flows=list(PAPER_FLOWS), progress=False,
        )  # fmt: skip
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        runner_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loop = papers_loop(model, data, args.window_size)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    loop_seconds = time.perf_counter() - start

    ordered = result.sort_values(["sample_index", "flow", "layer"], kind="stable")
    flow_order = {name: index for index, name in enumerate(PAPER_FLOWS)}
    ordered = ordered.assign(flow_order=ordered.flow.map(flow_order)).sort_values(
        ["sample_index", "flow_order", "layer"], kind="stable"
    )
    difference = (torch.tensor(ordered.relative_change.tolist()) - torch.tensor(loop)).abs().max()
    print(
        f"runner (mmlens.run, batch {args.batch_size}):  {len(data) / runner_seconds:8.2f} samples/s"
    )
    print(f"papers' loop (batch 1, one forward each): {len(data) / loop_seconds:8.2f} samples/s")
    print(f"speed-up: {loop_seconds / runner_seconds:.1f}x; max |difference| of relative change "
          f"{float(difference):.2e} percentage points")  # fmt: skip


if __name__ == "__main__":
    main()
