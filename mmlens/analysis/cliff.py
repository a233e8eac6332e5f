"""The "information-flow cliff" (From Redundancy to Relevance): accuracy when every image token
is truncated from layer l on, for each l; the cliff is where truncation stops hurting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool
from tqdm.auto import tqdm

from mmlens.ablations import drop_tokens
from mmlens.ablations.positions import PositionSet
from mmlens.analysis.probability import correct_answers
from mmlens.inputs import input_settings


@dataclass
class CliffResult:
    """`curve`: accuracy per truncation layer (`layer` = n_layers means no truncation);
    `baseline`: accuracy without truncation; `cliff_layer`: the first layer from which
    accuracy stays within `tolerance` of the baseline (None if even the last layer is not)."""

    curve: pd.DataFrame
    baseline: float
    cliff_layer: int | None
    tolerance: float


def cliff_layer(
    model: Any,
    inputs: Any | Sequence[Any],
    answers: Sequence[str] | Sequence[Sequence[str]],
    tolerance: float = 0.02,
    mode: str = "drop",
    progress: bool = True,
) -> CliffResult:
    """Accuracy with all image tokens truncated from each layer on.

    Args:
        inputs: `MultimodalInput`s (batches are fine: each item's image tokens are dropped).
        answers: per input, the answer of every batch item (a single string for batch-1 inputs);
            correct as `correct_answers` defines it.
        tolerance: accuracy drop (absolute, as a fraction) still counted as "no drop".
        mode: "drop" (really remove the tokens; fast) or "mask" (hide them as keys).

    Examples:
        >>> from mmlens.zoo.shapes import generate
        >>> samples = generate(7, seed=1)
        >>> inputs = [model.prepare(s.image, s.question) for s in samples]
        >>> result = cliff_layer(model, inputs, [s.answer for s in samples], progress=False)
        >>> result.curve.accuracy.round(2).tolist()   # image dropped from layer 0, ..., 5; none
        [0.0, 0.0, 0.71, 0.86, 0.86, 0.86, 1.0]
        >>> print(result.cliff_layer)     # no layer keeps the full accuracy within 2 points
        None
        >>> figure = mmlens.plot.cliff(result)
    """
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(answers) != len(inputs):
        raise ValueError(f"{len(answers)} answers for {len(inputs)} inputs")
    n_layers = model.cfg.n_layers
    correct = torch.zeros(n_layers + 1)
    n_items = 0
    for inp, answer in zip(tqdm(inputs, desc="cliff", disable=not progress), answers, strict=True):
        item_answers = [answer] if isinstance(answer, str) else list(answer)
        correct += correct_without_image(model, inp, item_answers, mode).sum(1)
        n_items += len(item_answers)
    accuracy = (correct / n_items).tolist()
    curve = pd.DataFrame({"layer": range(n_layers + 1), "accuracy": accuracy})
    curve.attrs.update(
        analysis="cliff_layer",
        model=model.cfg.model_name,
        n_samples=n_items,
        mode=mode,
        inputs=input_settings(inputs),
    )
    return cliff_of(curve, tolerance)


def cliff_of(curve: pd.DataFrame, tolerance: float = 0.02) -> CliffResult:
    """The cliff of an accuracy curve (``layer``, ``accuracy``; the last row is the untouched
    model): the first layer from which truncating every image token never costs more than
    `tolerance` of the baseline's accuracy.

    Examples:
        >>> cliff_of(mmlens.results.summary(mmlens.results.load("runs/cliff"))).cliff_layer
        3
    """
    accuracy = curve["accuracy"].tolist()
    baseline = accuracy[-1]
    within = [value >= baseline - tolerance for value in accuracy[:-1]]
    cliff = next((layer for layer in range(len(within)) if all(within[layer:])), None)
    return CliffResult(curve, baseline, cliff, tolerance)


def correct_without_image(
    model: Any, inp: Any, answers: str | Sequence[str], mode: str = "drop"
) -> Bool[torch.Tensor, "layer batch"]:
    """Whether each batch item is still answered correctly (`correct_answers`) with every image
    token removed from layer ``l`` on, for ``l = 0 .. n_layers``; row ``n_layers`` is the
    untouched model. The per-sample measurement behind `cliff_layer`.

    Examples:
        >>> correct_without_image(model, inp, "red")[:, 0]  # image dropped from layer 0, 1, ..., 6
        tensor([False, False,  True,  True,  True,  True,  True])
    """
    n_layers = model.cfg.n_layers
    images = PositionSet.per_batch_item(inp, "image")
    rows = []
    with torch.no_grad():
        for layer in range(n_layers + 1):
            hooks = drop_tokens(images, layer, mode) if layer < n_layers else []
            last_logits = model.run_with_hooks(inp, fwd_hooks=hooks)[:, -1]
            rows.append(correct_answers(model, inp, answers, last_logits))
    return torch.stack(rows)
