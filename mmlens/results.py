"""Reading a run directory written by `mmlens.run` / `mmlens run` (docs/experiments.md).

Examples:
    >>> result = mmlens.results.load("runs/knockout")
    >>> result.attrs["experiment"], result.attrs["options"]["window_size"]
    ('knockout', 3)
    >>> figure = mmlens.plot.knockout_sweep(result, facet="question_type")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file

from mmlens import metrics
from mmlens.experiments.store import RunStore, merged, read_rows


def load(out: str | Path) -> pd.DataFrame:
    """Every committed row of the run in `out`, in data-set order, with the run's settings in
    `attrs`: ``experiment``, ``options`` (flattened too, e.g. ``window_size``), ``preset``,
    ``model``, ``data``, ``dropped`` and ``failed`` (sample id -> reason), and ``manifest``
    (the whole manifest). The rows of all ranks and of resumed runs are merged; a sample is
    never twice.

    Raises:
        FileNotFoundError: `out` holds no run.
    """
    store = RunStore(out)
    if not store.manifest_path.is_file():
        raise FileNotFoundError(f"{out} holds no run (no manifest.json)")
    rows, records = read_rows(out)
    if len(rows):
        rows = rows.sort_values("sample_index", kind="stable").reset_index(drop=True)
    manifest = store.manifest()
    identity = manifest["identity"]
    rows.attrs = {
        **identity["options"],
        "experiment": identity["experiment"],
        "options": identity["options"],
        "preset": identity["preset"],
        "model": identity["model"]["name"],
        "data": identity["data"],
        "dropped": merged(records, "dropped"),
        "failed": merged(records, "failed"),
        "manifest": manifest,
    }
    return rows


def load_tensors(out: str | Path) -> dict[str, torch.Tensor]:
    """The tensors the run saved (e.g. ``cam``: sample id -> ``[layer, rows, cols]`` maps)."""
    store = RunStore(out)
    tensors: dict[str, torch.Tensor] = {}
    for record in store.records():
        if record["tensors"]:
            tensors.update(load_file(store.parts / f"{record['stem']}.safetensors"))
    return tensors


ID_COLUMNS = {"sample_index", "token", "answer_token"}
"""Numeric columns that name a thing (a position in the data set, a token id), which
`summary` never averages."""


def summary(result: pd.DataFrame) -> pd.DataFrame:
    """The aggregate of a loaded run: for ``truncation`` / ``fastv``, the data set's metric
    (`mmlens.metrics.summarize`) per condition; for ``cliff``, the accuracy per layer (the last
    layer row is the untouched model; `mmlens.analysis.cliff_of` finds its cliff and
    `mmlens.plot.cliff` draws it); for the others, the mean of each numeric column per
    question type and layer, flow, segment, module or answer variant (ids such as the answer's
    token are not quantities: left out, `ID_COLUMNS`).

    Examples:
        >>> mmlens.results.summary(mmlens.results.load("runs/truncation")).columns.tolist()
        ['condition', 'accuracy', 'n']
    """
    experiment = result.attrs["experiment"]
    if experiment in ("truncation", "fastv"):
        dataset = result.attrs["data"]["format"]
        return pd.DataFrame(
            [
                {"condition": condition, **metrics.summarize(dataset, rows)}
                for condition, rows in result.groupby("condition", sort=False)
            ]
        )
    if experiment == "cliff":
        curve = result.groupby("layer", as_index=False)["correct"].mean()
        curve = curve.rename(columns={"correct": "accuracy"})
        curve.attrs.update(model=result.attrs["model"], n_samples=result["sample_id"].nunique())
        return curve
    keys = ("question_type", "flow", "segment", "module", "variant", "layer")
    keys = [key for key in keys if key in result]
    values = result.drop(columns=[*ID_COLUMNS & set(result)]).select_dtypes("number").columns
    values = [value for value in values if value not in keys]
    return result.groupby(keys, as_index=False, dropna=False)[values].mean()


def describe(result: pd.DataFrame) -> dict[str, Any]:
    """A short account of a loaded run: experiment, preset, samples with rows, dropped, failed."""
    return dict(
        experiment=result.attrs["experiment"],
        preset=result.attrs["preset"],
        samples=int(result["sample_id"].nunique()) if len(result) else 0,
        dropped=len(result.attrs["dropped"]),
        failed=len(result.attrs["failed"]),
    )
