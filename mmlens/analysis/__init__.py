"""Measurements of both papers, each returning tidy results with a figure in `mmlens.plot`.

Analyses call models only through their public API (forward, hooks, caches).
"""

from mmlens.analysis.probability import (
    AnswerProbability,
    answer_probability,
    answer_token_ids,
    relative_change,
)
from mmlens.analysis.sweep import PAPER_FLOWS, PrefixCache, knockout_sweep

__all__ = [
    "PAPER_FLOWS",
    "AnswerProbability",
    "PrefixCache",
    "answer_probability",
    "answer_token_ids",
    "knockout_sweep",
    "relative_change",
]
