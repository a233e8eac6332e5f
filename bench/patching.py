"""Activation patching: `mmlens.patching` (a prefix run, then the cells as variants of a few
suffix runs) vs the per-cell loop of hooks that TransformerLens users write (one forward pass
per cell), side by side on the same pair; and attribution patching (AtP, integrated gradients
over 4 steps, AtP*) against the exact result: time and rank correlation of the cells. On the
organism, also edge attribution (EAP-IG, 8 steps) against exact patching of its top 50 edges one
at a time: time per edge, extrapolated to every edge, and the correlation.

The pair is a counterfactual of `mmlens.zoo.shapes` (the asked object repainted). Both sweep the
residual stream, attention and MLP outputs of every layer at every aligned segment and compare
the metric (the logit difference of the two answers) cell by cell. With `--llava-shaped`, the
pair runs on a LLaVA-1.5-shaped random checkpoint (576 image tokens); its metric then compares
two arbitrary tokens, which is enough to time and check the two methods.

    python bench/patching.py [--llava-shaped] [--batch-size 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from timing import bench_model

from mmlens.patching import (
    SITES,
    activation_patching,
    aligned_positions,
    attribution_patching,
    edge_attribution_patching,
    edge_patching,
    logit_difference,
    top_edges,
)
from mmlens.zoo.shapes import counterfactual, generate

PATCHED_SITES = ("resid_pre", "attn_out", "mlp_out")


def per_cell_loop(model, clean, corrupted, metric) -> list[float]:
    """One forward pass per (site, layer, segment), a hook copying the clean activation in."""
    pairs, _ = aligned_positions(clean, corrupted)
    names = [SITES[site].format(layer=layer) for site in PATCHED_SITES
             for layer in range(model.cfg.n_layers)]  # fmt: skip
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=names)
    scores = []
    for site in PATCHED_SITES:
        for layer in range(model.cfg.n_layers):
            name = SITES[site].format(layer=layer)
            for here, there in pairs.values():

                def patch(activation, hook, here=here, there=there, name=name):
                    activation = activation.clone()
                    activation[0, there] = cache[name][0, here]
                    return activation

                with torch.no_grad():
                    logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])
                scores.append(float(metric(logits)[0]))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--llava-shaped", action="store_true")
    args = parser.parse_args()

    model = bench_model(args.llava_shaped, args.device)
    clean_sample = generate(1, seed=0)[0]
    corrupted_sample = counterfactual(clean_sample)
    clean = model.prepare(clean_sample.image, clean_sample.question).to(args.device)
    corrupted = model.prepare(corrupted_sample.image, corrupted_sample.question).to(args.device)
    if args.llava_shaped:  # a random model: compare two tokens it does rank differently
        with torch.no_grad():
            top = model(clean)[0, -1].argsort(descending=True)
        correct, incorrect = model.to_string(top[0]), model.to_string(top[1])
    else:
        correct, incorrect = clean_sample.answer, corrupted_sample.answer
    metric = logit_difference(model, clean, correct.strip(), incorrect.strip())
    print(
        f"device={args.device} model={model.cfg.model_name} layers={model.cfg.n_layers} "
        f"positions={clean.input_ids.shape[1]} sites={list(PATCHED_SITES)} "
        f"batch_size={args.batch_size} threads={torch.get_num_threads()}"
    )

    def batched():
        return activation_patching(
            model, clean, corrupted, metric, sites=PATCHED_SITES, batch_size=args.batch_size,
            progress=False,
        )  # fmt: skip

    batched()  # warm-up
    start = time.perf_counter()
    result = batched()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loop = per_cell_loop(model, clean, corrupted, metric)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    loop_seconds = time.perf_counter() - start

    difference = (torch.tensor(result.metric.tolist()) - torch.tensor(loop)).abs().max()
    cells = len(result)
    print(f"mmlens.patching (2 forward passes, {result.attrs['suffix_runs']} suffix runs): "
          f"{batched_seconds:7.3f} s for {cells} cells")  # fmt: skip
    print(f"per-cell loop ({cells + 1} forward passes):      {loop_seconds:7.3f} s")
    print(f"speed-up: {loop_seconds / batched_seconds:.1f}x; max |difference| of the metric "
          f"{float(difference):.2e}")  # fmt: skip
    exact = pd.Series(result.normalized.tolist())
    for method, steps in (("atp", 1), ("atp*", 1), ("ig", 4)):
        start = time.perf_counter()
        estimate = attribution_patching(
            model, clean, corrupted, metric, sites=PATCHED_SITES, method=method, steps=steps
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ranks = pd.Series(estimate.normalized.tolist()).rank().corr(exact.rank())
        print(f"attribution_patching method={method} steps={steps}: {seconds:7.3f} s "
              f"({batched_seconds / seconds:.1f}x the exact batched sweep); Spearman rank "
              f"correlation with exact {ranks:.3f}, Pearson "
              f"{pd.Series(estimate.normalized.tolist()).corr(exact):.3f}")  # fmt: skip

    if not args.llava_shaped:
        edge_attribution(model, clean, corrupted, metric, args.device)


def edge_attribution(model, clean, corrupted, metric, device: str, n_checked: int = 50) -> None:
    """EAP-IG over every edge vs exact edge patching, timed side by side."""
    start = time.perf_counter()
    edges = edge_attribution_patching(model, clean, corrupted, metric, method="eap-ig", steps=8)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    scored = time.perf_counter() - start
    start = time.perf_counter()
    exact = edge_patching(model, clean, corrupted, metric, top_edges(edges, n_checked))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per_edge = (time.perf_counter() - start) / n_checked
    every_edge = per_edge * len(edges)
    print(f"edge_attribution_patching eap-ig steps=8: {scored:7.3f} s for {len(edges)} edges; "
          f"exact edge patching {per_edge * 1e3:.1f} ms an edge, {every_edge:.0f} s for every "
          f"edge (extrapolated): {every_edge / scored:.0f}x; on the top {n_checked}: Pearson "
          f"{exact.score.corr(exact.effect):.3f}, Spearman "
          f"{exact.score.rank().corr(exact.effect.rank()):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
