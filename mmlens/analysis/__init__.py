"""Measurements of both papers, each returning tidy results with a figure in `mmlens.plot`.

Analyses call models only through their public API (forward, hooks, caches, `run_prefix` /
`run_suffix`, `to_logits`).
"""

from mmlens.analysis.cam import CamResult, llava_cam
from mmlens.analysis.cliff import CliffResult, cliff_layer, cliff_of, correct_without_image
from mmlens.analysis.grounding import box_scores, last_row_attention_maps
from mmlens.analysis.lens import (
    HighNormPatches,
    answer_token_variants,
    attention_share,
    high_norm_patches,
    logit_lens,
)
from mmlens.analysis.probability import (
    AnswerProbability,
    answer_probability,
    answer_token_ids,
    correct_answers,
    relative_change,
)
from mmlens.analysis.semantics import module_knockout_jaccard
from mmlens.analysis.sweep import PAPER_FLOWS, PATCH_FLOWS, SweepError, knockout_sweep

__all__ = [
    "PAPER_FLOWS",
    "PATCH_FLOWS",
    "AnswerProbability",
    "CamResult",
    "CliffResult",
    "HighNormPatches",
    "SweepError",
    "answer_probability",
    "answer_token_ids",
    "answer_token_variants",
    "box_scores",
    "correct_answers",
    "last_row_attention_maps",
    "attention_share",
    "cliff_layer",
    "cliff_of",
    "correct_without_image",
    "high_norm_patches",
    "knockout_sweep",
    "llava_cam",
    "logit_lens",
    "module_knockout_jaccard",
    "relative_change",
]
