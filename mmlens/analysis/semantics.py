"""Module knockout scored by the semantic change of the question's representation
(Cross-modal Information Flow, appendix D/K): Jaccard similarity of top-k logit-lens words."""

from __future__ import annotations

from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.analysis.sweep import PositionSpec, active_layers, resolve_positions
from mmlens.hooks import HookPoint
from mmlens.inputs import input_settings
from mmlens.sequence import sequence_of


def module_knockout_jaccard(
    model: Any,
    inp: Any,
    module: Literal["mlp", "attn"] = "mlp",
    window: int = 9,
    k: int = 10,
    positions: PositionSpec = "question",
    zero_at: Literal["all", "positions"] = "all",
    batch_size: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Jaccard similarity of the top-`k` words at `positions` with and without the module.

    For every start layer l, zero `hook_{module}_out` in layers `l .. min(l + window, L) - 1`
    (the paper's forward window of 9 layers, not centred), take the top-`k` tokens of the final
    layer's residual (final norm applied, unembedded: the model's logits) at each of `positions`,
    pool them into one set (up to k·|positions| words) and compare with the clean run's set:
    `|A ∩ B| / |A ∪ B|`. `zero_at="all"` zeroes the module at every position (module knockout);
    `"positions"` only at `positions`, which lets the run reuse the clean prefix.

    Returns a DataFrame: `layer` (window start), `window_end` (exclusive), `module`, `jaccard`.

    Examples:
        >>> result = module_knockout_jaccard(model, inp, module="attn", progress=False)
        >>> result.columns.tolist(), len(result)          # one row per window start
        (['layer', 'window_end', 'module', 'jaccard'], 6)
        >>> figure = mmlens.plot.module_knockout_jaccard(result)
    """
    if module not in ("mlp", "attn"):
        raise ValueError(f"module must be 'mlp' or 'attn', got {module!r}")
    if zero_at not in ("all", "positions"):
        raise ValueError(f"zero_at must be 'all' or 'positions', got {zero_at!r}")
    if inp.batch_size != 1:
        raise ValueError("module_knockout_jaccard takes one sample (a batch-1 input)")
    read = resolve_positions(positions, inp).to(inp.input_ids.device)
    with torch.no_grad():
        prefix = model.run_prefix(inp)
    clean_words = _top_words(prefix.logits[0, read], k)
    n_layers, n_positions = model.cfg.n_layers, inp.input_ids.shape[1]
    # Zeroing at every position changes every position from the window's first layer on;
    # zeroing only at `positions` changes nothing before the first of them.
    start = int(read.min()) if zero_at == "positions" else 0
    read_rows = torch.isin(torch.arange(start, n_positions, device=read.device), read)

    windows = [range(first, min(first + window, n_layers)) for first in range(n_layers)]
    chunk = batch_size or n_layers
    rows = []
    for first in tqdm(range(0, n_layers, chunk), desc=f"{module} knockout", disable=not progress):
        part = windows[first : first + chunk]
        hook = _zero_variants(part, n_layers, read if zero_at == "positions" else None)
        with torch.no_grad():
            logits = model.run_suffix(
                prefix,
                start,
                n_variants=len(part),
                entry_layers=[layers.start for layers in part],
                fwd_hooks=[
                    (f"blocks.{layer}.hook_{module}_out", hook) for layer in range(n_layers)
                ],
            )
        for layers, variant_logits in zip(part, logits, strict=True):
            words = _top_words(variant_logits[read_rows], k)
            jaccard = len(words & clean_words) / len(words | clean_words)
            rows.append(
                dict(layer=layers.start, window_end=layers.stop, module=module, jaccard=jaccard)
            )
    result = pd.DataFrame(rows)
    result.attrs.update(
        analysis="module_knockout_jaccard",
        model=model.cfg.model_name,
        module=module,
        window=window,
        k=k,
        positions=positions if isinstance(positions, str) else "custom",
        zero_at=zero_at,
        inputs=input_settings(inp),
    )
    return result


def _top_words(logits: Float[Tensor, "pos vocab"], k: int) -> set[int]:
    return set(logits.topk(k, dim=-1).indices.flatten().tolist())


def _zero_variants(windows: list[range], n_layers: int, positions: Int[Tensor, "n"] | None):
    """A module-output hook for `run_suffix`: variant v is zeroed in the layers `windows[v]`,
    at `positions` (or everywhere)."""
    active = active_layers(windows, n_layers)

    def zero(out: Float[Tensor, "batch pos d_model"], hook: HookPoint) -> Tensor:
        state = sequence_of(hook)
        rows = active.to(out.device)[state.layer][state.variant]  # [batch, pos]
        if positions is not None:
            rows = rows & torch.isin(state.query_positions, positions.to(out.device))
        return out.masked_fill(rows[..., None], 0.0)

    return zero
