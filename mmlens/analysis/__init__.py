"""Measurements of both papers, each returning tidy results with a figure in `mmlens.plot`.

Analyses call models only through their public API (forward, hooks, caches).
"""

from mmlens.analysis.cliff import CliffResult, cliff_layer
from mmlens.analysis.probability import (
    AnswerProbability,
    answer_probability,
    answer_token_ids,
    relative_change,
)
from mmlens.analysis.semantics import module_knockout_jaccard
from mmlens.analysis.sweep import PAPER_FLOWS, PrefixCache, knockout_sweep

__all__ = [
    "PAPER_FLOWS",
    "AnswerProbability",
    "CliffResult",
    "PrefixCache",
    "answer_probability",
    "answer_token_ids",
    "cliff_layer",
    "knockout_sweep",
    "module_knockout_jaccard",
    "relative_change",
]
