"""How good an SAE is: reconstruction, sparsity, what splicing it in costs the model, and which
features track the colour, shape and position of `mmlens.zoo.shapes` objects (docs/zoo.md,
"tiny-shapes-sae")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.analysis import answer_token_ids
from mmlens.sae.autoencoder import SparseAutoencoder
from mmlens.zoo.shapes import COLORS, SHAPES, ShapesSample
from mmlens.zoo.shapes.scene import MARGIN, PATCH

SEGMENTS = ("image", "question", "last")
"""The positions an SAE of the zoo is trained and evaluated on."""


def collect_activations(
    model: Any,
    samples: Sequence[Any],
    hook_name: str,
    segments: Sequence[str] = SEGMENTS,
    batch_size: int = 32,
    progress: bool = True,
) -> Float[Tensor, "n_positions d"]:
    """The activations at `hook_name` of every position of `segments` of every sample
    (``sample.image``, ``sample.question``), one row each.

    Examples:
        >>> from mmlens.sae.evaluation import collect_activations
        >>> x = collect_activations(model, [sample], "blocks.2.hook_resid_post", progress=False)
        >>> x.shape          # 64 image tokens, the question's 7 words and the last position
        torch.Size([72, 128])
    """
    rows = []
    for start in tqdm(range(0, len(samples), batch_size), desc="activations", disable=not progress):
        batch = samples[start : start + batch_size]
        inp = model.prepare([s.image for s in batch], [s.question for s in batch])
        with torch.no_grad():
            _, cache = model.run_with_cache(inp, names_filter=hook_name)
        for item in range(len(batch)):
            positions = torch.cat([inp.positions(name, item) for name in segments]).unique()
            rows.append(cache[hook_name][item, positions])
    return torch.cat(rows)


def evaluate(
    model: Any, sae: SparseAutoencoder, samples: Sequence[ShapesSample], batch_size: int = 32
) -> dict[str, float]:
    """Reconstruction and sparsity on the positions of `SEGMENTS`, and the answers with the SAE
    spliced in (no error term) against the clean model.

    Returns:
        ``mse`` (mean squared error per element), ``explained_variance`` (1 - residual sum of
        squares / total sum of squares about the mean activation), ``l0`` (active features per
        position), ``dead_fraction`` (features never active), ``accuracy`` and
        ``accuracy_spliced`` (first answer token, `correct_answers`' rule), ``ce`` and
        ``ce_spliced`` (cross-entropy of the answer's first token, nats).

    Examples:
        >>> from mmlens.sae.evaluation import evaluate
        >>> scores = evaluate(model, mmlens.sae.load("tiny-shapes-sae"), [sample])
        >>> scores["explained_variance"] > 0.8, scores["accuracy_spliced"]
        (True, 1.0)
    """
    x = collect_activations(
        model, samples, sae.cfg.hook_name, batch_size=batch_size, progress=False
    )
    with torch.no_grad():
        acts = sae.encode(x)
        residual = x - sae.decode(acts, x)
    scores = {
        "mse": residual.pow(2).mean().item(),
        "explained_variance": 1 - (residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "l0": (acts > 0).float().sum(-1).mean().item(),
        "dead_fraction": ((acts > 0).sum(0) == 0).float().mean().item(),
    }
    clean, spliced = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        inp = model.prepare([s.image for s in batch], [s.question for s in batch])
        answers = torch.tensor(
            [answer_token_ids(model, inp, s.answer, i)[0] for i, s in enumerate(batch)]
        )
        with torch.no_grad():
            clean.append((model(inp)[:, -1], answers))
            spliced.append((model.run_with_saes(inp, saes=[sae])[:, -1], answers))
    for name, runs in (("", clean), ("_spliced", spliced)):
        logits = torch.cat([run[0] for run in runs])
        answers = torch.cat([run[1] for run in runs])
        scores[f"accuracy{name}"] = (logits.argmax(-1) == answers).float().mean().item()
        scores[f"ce{name}"] = torch.nn.functional.cross_entropy(logits, answers).item()
    return scores


def patch_attributes(sample: ShapesSample, grid: int = 8) -> pd.DataFrame:
    """One row per image patch (row-major over the `grid` x `grid` patches): ``row``, ``col``
    and, where an object's cell covers the patch, its ``color``, ``shape`` and ``size`` (else
    "background")."""
    rows = [
        {"row": r, "col": c, "color": "background", "shape": "background", "size": "background"}
        for r in range(grid)
        for c in range(grid)
    ]
    for obj in sample.objects:
        x0, y0, x1, y1 = obj.footprint  # the cell of patches less MARGIN on every side
        for r in range((y0 - MARGIN) // PATCH, (y1 + MARGIN) // PATCH):
            for c in range((x0 - MARGIN) // PATCH, (x1 + MARGIN) // PATCH):
                rows[r * grid + c].update(color=obj.color, shape=obj.shape, size=obj.size)
    return pd.DataFrame(rows)


def feature_attributes(
    model: Any, sae: SparseAutoencoder, samples: Sequence[ShapesSample], batch_size: int = 32
) -> pd.DataFrame:
    """Per feature, the object attribute its activation over the image patches correlates with
    most (Pearson, over every patch of every sample): one of ``color=<c>``, ``shape=<s>``,
    ``row=<r>``, ``col=<c>``, ``background``.

    Returns:
        one row per feature that is active somewhere: ``feature``, ``attribute``,
        ``correlation``, ``frequency`` (fraction of patches where it is active), sorted by
        correlation, strongest first.

    Examples:
        >>> from mmlens.sae.evaluation import feature_attributes
        >>> table = feature_attributes(model, mmlens.sae.load("tiny-shapes-sae"),
        ...                            mmlens.zoo.shapes.generate(16, seed=7))
        >>> list(table.columns)
        ['feature', 'attribute', 'correlation', 'frequency']
    """
    from mmlens.sae.features import patch_activations

    acts, labels = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        inp = model.prepare([s.image for s in batch], [s.question for s in batch])
        grids = patch_activations(model, inp, sae)  # [batch, rows, cols, d_sae]
        acts.append(grids.flatten(1, 2).flatten(0, 1))
        labels += [patch_attributes(s, grids.shape[1]) for s in batch]
    features = torch.cat(acts).double()
    table = pd.concat(labels, ignore_index=True)
    indicators = {f"color={c}": table.color == c for c in COLORS}
    indicators |= {f"shape={s}": table["shape"] == s for s in SHAPES}
    indicators |= {f"row={r}": table.row == r for r in sorted(table.row.unique())}
    indicators |= {f"col={c}": table.col == c for c in sorted(table.col.unique())}
    indicators["background"] = table.color == "background"
    names = list(indicators)
    targets = torch.from_numpy(np.stack([indicators[n].to_numpy() for n in names], 1)).double()
    correlation = _pearson(features, targets)  # [d_sae, n_attributes]
    active = (features > 0).double().mean(0)
    best = correlation.nan_to_num(0).abs().argmax(-1)
    rows = [
        {
            "feature": f,
            "attribute": names[best[f]],
            "correlation": correlation[f, best[f]].item(),
            "frequency": active[f].item(),
        }
        for f in range(features.shape[1])
        if active[f] > 0
    ]
    return pd.DataFrame(rows).sort_values("correlation", ascending=False, ignore_index=True)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """Correlation of every column of `a` with every column of `b` (NaN for a constant)."""
    a, b = a - a.mean(0), b - b.mean(0)
    return (a.T @ b) / (a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :])
