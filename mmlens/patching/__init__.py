"""Patching a corrupted run with a clean one's activations: exactly, one cell at a time on the
prefix-reusing engine (`mmlens.patching.activation`), or by its first-order estimates, every
cell at once from one backward pass (`mmlens.patching.attribution`); and the edges between
components and segments, scored and pruned to circuits (`mmlens.patching.edges`). Both take the same
arguments and give the same table (docs/analyses.md, "Activation patching" and "Attribution
patching")."""

from mmlens.patching.activation import (
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
