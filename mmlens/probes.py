"""Linear probes: what a layer's residual stream at a prompt segment says about a label,
fitted per layer × segment, with held-out accuracy and the direction each probe reads
(docs/analyses.md, "Steering and probes").

A probe is multinomial logistic regression on the mean of the site's activations over the
segment's positions of each sample, standardised with the training split's mean and deviation,
with a small L2 penalty, fitted by L-BFGS (deterministic).

Examples:
    >>> from mmlens.probes import fit_probes
    >>> from mmlens.zoo.shapes import generate
    >>> samples = [s for s in generate(60, seed=7, question_types=["QueryAttr"]) if s.subtype == "color"]
    >>> inputs = [model.prepare(s.image, s.question) for s in samples]
    >>> result = fit_probes(model, inputs, [s.answer for s in samples], layers=[0, 5], segments=["last"])
    >>> result[["layer", "segment", "n_test"]].values.tolist()
    [[0, 'last', 8], [5, 'last', 8]]
    >>> result.attrs["probes"][(5, "last")].direction.shape     # one row per colour seen
    torch.Size([6, 128])
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.steering import segment_means


@dataclass(frozen=True)
class Probe:
    """One fitted probe: `classes`, the standardisation (`mean`, `scale`), `weight`
    ``[class, d_model]`` and `bias` on the standardised features."""

    layer: int
    segment: str
    classes: tuple[str, ...]
    mean: Float[Tensor, "d_model"]
    scale: Float[Tensor, "d_model"]
    weight: Float[Tensor, "class d_model"]
    bias: Float[Tensor, "class"]

    @property
    def direction(self) -> Float[Tensor, "class d_model"]:
        """Each class's direction in the residual stream's own units (``weight / scale``): the
        logit of class c moves by ``direction[c] · dx`` for a change dx of the activations."""
        return self.weight / self.scale

    def predict(self, features: Float[Tensor, "n d_model"]) -> list[str]:
        """The class of each row of `features` (segment means at this probe's layer)."""
        logits = ((features - self.mean) / self.scale) @ self.weight.T + self.bias
        return [self.classes[index] for index in logits.argmax(-1).tolist()]


def fit_probes(
    model: Any,
    inputs: Sequence[Any],
    labels: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    segments: Sequence[str] = ("image", "question", "last"),
    site: str = "resid_post",
    test_fraction: float = 0.25,
    l2: float = 1e-2,
    seed: int = 0,
    progress: bool = False,
) -> pd.DataFrame:
    """Fit a probe for each layer × segment from the samples' segment means and score it on a
    held-out split.

    Args:
        inputs: one prepared input per sample (each a single prompt), `labels` their labels.
        layers: default every layer.
        segments: names accepted by `inp.positions`.
        site: a key of `mmlens.steering.STEERING_SITES`.
        test_fraction: the share of samples held out (shuffled with `seed`; at least one).
        l2: the penalty on the weights (standardised features).

    Returns:
        One row per layer × segment: `layer`, `segment`, `train_accuracy`, `test_accuracy`,
        `chance` (the held-out share of the training split's most frequent label), `n_train`,
        `n_test`; ``attrs["probes"]``: ``{(layer, segment): Probe}``.

    Raises:
        ValueError: inputs and labels of different lengths, a batched input, fewer than two
            classes, or too few samples to hold any out.
    """
    if len(inputs) != len(labels):
        raise ValueError(f"{len(inputs)} inputs for {len(labels)} labels: one label per input")
    if any(inp.batch_size != 1 for inp in inputs):
        raise ValueError("pass one prepared prompt per sample (inp.batch_size == 1)")
    classes = tuple(sorted(set(labels)))
    if len(classes) < 2:
        raise ValueError(f"the labels have one class ({classes}); a probe needs two or more")
    order = list(range(len(inputs)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(order)))
    if n_test >= len(order):
        raise ValueError(f"{len(order)} samples leave none to train on; use more samples")
    test, train = order[:n_test], order[n_test:]
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    target = torch.tensor([classes.index(label) for label in labels])
    majority = max(classes, key=lambda c: sum(labels[i] == c for i in train))
    chance = sum(labels[i] == majority for i in test) / len(test)
    rows, probes = [], {}
    for segment in tqdm(segments, desc="probes", disable=not progress):
        features = segment_means(model, inputs, layers, segment, site)  # [sample, layer, d]
        for column, layer in enumerate(layers):
            x = features[:, column]
            probe = _fit(x[train], target[train], classes, layer, segment, l2)
            accuracy = {
                split: sum(
                    predicted == labels[i]
                    for predicted, i in zip(probe.predict(x[indices]), indices, strict=True)
                )
                / len(indices)
                for split, indices in (("train", train), ("test", test))
            }
            probes[(layer, segment)] = probe
            rows.append(
                dict(
                    layer=layer,
                    segment=segment,
                    train_accuracy=accuracy["train"],
                    test_accuracy=accuracy["test"],
                    chance=chance,
                    n_train=len(train),
                    n_test=len(test),
                )  # fmt: skip
            )
    result = pd.DataFrame(rows)
    result.attrs = dict(analysis="probes", site=site, classes=list(classes), probes=probes)
    return result


def _fit(
    x: Float[Tensor, "n d_model"],
    target: Tensor,
    classes: tuple[str, ...],
    layer: int,
    segment: str,
    l2: float,
) -> Probe:
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    standard = (x - mean) / scale
    weight = torch.zeros(len(classes), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(classes), requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.cross_entropy(standard @ weight.T + bias, target)
        value = value + l2 * weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return Probe(layer, segment, classes, mean, scale, weight.detach(), bias.detach())
