"""POPE metrics (Li et al. 2023) from parsed "yes"/"no" answers, "yes" being the positive class.

The definitions are LLaVA's ``eval_pope.py``; all values are fractions in [0, 1], and a ratio
whose denominator is zero (no predicted "yes" for precision, no "yes" label for recall, no
samples) is 0.0 instead of an error.
"""

from __future__ import annotations

from collections.abc import Sequence

_ANSWERS = ("yes", "no")


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and the share of "yes" predictions.

    `predictions` are parsed answers (`mmlens.metrics.parse_yes_no`), `labels` the references;
    both hold only "yes" and "no".

    Raises:
        ValueError: the two have different lengths, or hold something other than "yes"/"no".

    Examples:
        >>> pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
        {'accuracy': 0.5, 'precision': 0.5, 'recall': 0.5, 'f1': 0.5, 'yes_ratio': 0.5}
    """
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    unexpected = sorted(set(predictions).union(labels).difference(_ANSWERS))
    if unexpected:
        raise ValueError(f"POPE answers must be 'yes' or 'no', got {unexpected}")
    pairs = list(zip(predictions, labels, strict=True))
    true_positives = pairs.count(("yes", "yes"))
    false_positives = pairs.count(("yes", "no"))
    false_negatives = pairs.count(("no", "yes"))
    true_negatives = pairs.count(("no", "no"))
    predicted_yes = true_positives + false_positives
    labelled_yes = true_positives + false_negatives
    precision = true_positives / predicted_yes if predicted_yes else 0.0
    recall = true_positives / labelled_yes if labelled_yes else 0.0
    return {
        "accuracy": (true_positives + true_negatives) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": predicted_yes / len(pairs) if pairs else 0.0,
    }
