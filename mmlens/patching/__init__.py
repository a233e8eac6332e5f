"""Patching a corrupted run with a clean one's activations: exactly, one cell at a time on the
prefix-reusing engine (`mmlens.patching.activation`), or by its first-order estimates, every
cell at once from one backward pass (`mmlens.patching.attribution`); both take the same
arguments and give the same table. And the edges between components and segments, scored,
patched exactly and pruned to circuits (`mmlens.patching.edges`). Semantics: docs/analyses.md
("Activation patching", "Attribution patching", "Edge attribution")."""

from mmlens.patching.activation import (
    HEAD_SITES,
    SITES,
    UNITS,
    Metric,
    activation_patching,
    aligned_positions,
    logit_difference,
)
from mmlens.patching.attribution import attribution_patching
from mmlens.patching.edges import (
    edge_attribution_patching,
    edge_graph,
    edge_patching,
    faithfulness,
    top_edges,
)

__all__ = [
    "HEAD_SITES",
    "SITES",
    "UNITS",
    "Metric",
    "activation_patching",
    "aligned_positions",
    "attribution_patching",
    "edge_attribution_patching",
    "edge_graph",
    "edge_patching",
    "faithfulness",
    "logit_difference",
    "top_edges",
]
