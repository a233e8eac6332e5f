"""Benchmark metrics: per-sample scores of generated answers and their summaries.

`score_sample` turns one generated answer into flat values (str, int, float) that fit a Parquet
row; `summarize` aggregates a data frame of such rows into the benchmark's numbers. Every rate
is a fraction in [0, 1], never a percentage; a rate over zero samples is 0.0, and ``n`` (the
number of rows) says how much it rests on.

=====================  ==============================================  =========================
data set               per sample                                      summary
=====================  ==============================================  =========================
gqa, shapes, custom    prediction (normalised), correct (exact match)  accuracy, n
pope                   prediction ("yes"/"no", LLaVA's rule), label,   accuracy, precision,
                       correct                                         recall, f1, yes_ratio, n
scienceqa              prediction (letter or "FAILED"), correct        accuracy, n
textvqa                prediction (normalised), accuracy (VQA)         accuracy, n
chair                  mentioned, hallucinated (comma-separated COCO   CHAIR_s, CHAIR_i, n
                       categories), n_mentioned, n_hallucinated
=====================  ==============================================  =========================
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from mmlens.metrics.answers import (
    PARSE_FAILED,
    exact_match,
    normalize_answer,
    parse_option_letter,
    parse_yes_no,
    vqa_accuracy,
)
from mmlens.metrics.chair import (
    COCO_CATEGORIES,
    SYNONYMS,
    chair_rates,
    chair_scores,
    mentioned_objects,
)
from mmlens.metrics.pope import pope_metrics

EXACT_MATCH_DATASETS = ("gqa", "shapes", "custom")
DATASETS = (*EXACT_MATCH_DATASETS, "pope", "scienceqa", "textvqa", "chair")

__all__ = [
    "COCO_CATEGORIES",
    "DATASETS",
    "PARSE_FAILED",
    "SYNONYMS",
    "chair_rates",
    "chair_scores",
    "exact_match",
    "mentioned_objects",
    "normalize_answer",
    "parse_option_letter",
    "parse_yes_no",
    "pope_metrics",
    "score_sample",
    "summarize",
    "vqa_accuracy",
]


def score_sample(dataset: str, sample: Any, prediction: str) -> dict[str, float | str | int]:
    """Per-sample values of one generated answer (`prediction`) to `sample` of `dataset`.

    `sample` needs the attributes of `mmlens.data.sample.Sample` that the data set uses:
    ``answer`` (gqa, shapes, custom, pope, scienceqa), ``answers`` (textvqa), ``options``
    (scienceqa) and ``metadata["objects"]`` (chair: the image's COCO categories).

    Raises:
        ValueError: `dataset` is unknown, or the sample lacks the reference it needs.

    Examples:
        >>> from types import SimpleNamespace
        >>> score_sample("pope", SimpleNamespace(answer="no"), "No, there is no dog.")
        {'prediction': 'no', 'label': 'no', 'correct': 1}
    """
    if dataset in EXACT_MATCH_DATASETS:
        answer = _reference_answer(dataset, sample)
        return {
            "prediction": normalize_answer(prediction),
            "correct": int(exact_match(prediction, answer)),
        }
    if dataset == "pope":
        answer = _reference_answer(dataset, sample)
        parsed = parse_yes_no(prediction)
        return {"prediction": parsed, "label": answer, "correct": int(parsed == answer)}
    if dataset == "scienceqa":
        answer = _reference_answer(dataset, sample)
        letter = parse_option_letter(prediction, len(sample.options))
        return {"prediction": letter, "correct": int(letter == answer)}
    if dataset == "textvqa":
        return {
            "prediction": normalize_answer(prediction),
            "accuracy": vqa_accuracy(prediction, sample.answers),
        }
    if dataset == "chair":
        scores = chair_scores([prediction], [sample.metadata["objects"]])
        mentioned, hallucinated = scores["mentioned"][0], scores["hallucinated"][0]
        return {
            "mentioned": ",".join(mentioned),
            "hallucinated": ",".join(hallucinated),
            "n_mentioned": len(mentioned),
            "n_hallucinated": len(hallucinated),
        }
    raise _unknown_dataset(dataset)


def summarize(dataset: str, per_sample: pd.DataFrame) -> dict[str, float]:
    """The benchmark's numbers for `dataset` from the rows `score_sample` produced.

    Raises:
        ValueError: `dataset` is unknown.

    Examples:
        >>> import pandas as pd
        >>> summarize("gqa", pd.DataFrame({"prediction": ["red", "2"], "correct": [1, 0]}))
        {'accuracy': 0.5, 'n': 2}
    """
    n = {"n": len(per_sample)}
    if dataset in (*EXACT_MATCH_DATASETS, "scienceqa"):
        return {"accuracy": _mean(per_sample["correct"]), **n}
    if dataset == "textvqa":
        return {"accuracy": _mean(per_sample["accuracy"]), **n}
    if dataset == "pope":
        return {**pope_metrics(per_sample["prediction"], per_sample["label"]), **n}
    if dataset == "chair":
        return {**chair_rates(per_sample["n_mentioned"], per_sample["n_hallucinated"]), **n}
    raise _unknown_dataset(dataset)


def _reference_answer(dataset: str, sample: Any) -> str:
    """`sample.answer`, which these data sets need."""
    if sample.answer is None:
        raise ValueError(f"a {dataset} sample needs a reference answer, and this one has none")
    return sample.answer


def _mean(column: pd.Series) -> float:
    """The mean of `column`, 0.0 when it is empty."""
    return float(column.mean()) if len(column) else 0.0


def _unknown_dataset(dataset: str) -> ValueError:
    """The error for a data set neither dispatcher knows, listing those they do."""
    return ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
