"""Ablations as TransformerLens hook lists `[(hook_name, fn), ...]`.

Every factory returns a plain list, so ablations compose by concatenation and work with
`run_with_hooks`, `run_with_cache`, `hooks()` and `generate`. Positions are original sequence
indices (image tokens expanded): a 1-D set shared by the batch, or a list with one set per batch
item. They keep addressing the same tokens after pruning and during generation.

Examples:
    >>> from mmlens.ablations import attention_knockout, drop_tokens, window
    >>> layers = window(2, 3, model.cfg.n_layers)                    # layers 1, 2, 3
    >>> hooks = attention_knockout(inp.positions("image"), inp.positions("last"), layers)
    >>> hooks += drop_tokens(inp.positions("image"), from_layer=4)
    >>> model.run_with_hooks(inp, fwd_hooks=hooks).shape              # 64 image tokens gone
    torch.Size([1, 41, 70])
"""

from mmlens.ablations.knockout import (
    attention_knockout,
    attention_knockout_post_softmax,
    block_edges,
    window,
)
from mmlens.ablations.positions import PositionSet
from mmlens.ablations.pruning import (
    LaterRowsHook,
    drop_tokens,
    fastv,
    truncate_image_tokens,
)
from mmlens.ablations.zeroing import zero_attention, zero_heads, zero_mlp

__all__ = [
    "LaterRowsHook",
    "PositionSet",
    "attention_knockout",
    "block_edges",
    "attention_knockout_post_softmax",
    "drop_tokens",
    "fastv",
    "truncate_image_tokens",
    "window",
    "zero_attention",
    "zero_heads",
    "zero_mlp",
]
