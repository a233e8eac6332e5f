"""What every figure of `mmlens.plot` shares: the widest a figure is drawn, the colours, dashes
and markers a series takes, and how a checkpoint is named in a title."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MAX_WIDTH = 1100
"""The widest a figure is drawn (pixels): it and its legend fit a 1280-pixel screen, and the
report's column (`mmlens.report`)."""

DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
MARKERS = ["circle", "square", "diamond", "triangle-up", "x", "star"]
COLOURS = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880"]


def model_name(name: Any) -> str:
    """A checkpoint's name for a title: its folder's name, not the whole path.

    Examples:
        >>> model_name("/checkpoints/llava-1.5-7b-hf")
        'llava-1.5-7b-hf'
    """
    return Path(str(name)).name if name else "model"


def colour(keys: Any, key: Any) -> str:
    """The colour of `key` among `keys` (the same in every panel).

    Examples:
        >>> colour(["image", "question"], "question")
        '#ef553b'
    """
    return COLOURS[list(keys).index(key) % len(COLOURS)]
