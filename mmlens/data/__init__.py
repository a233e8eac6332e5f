"""Data sets as the papers published them, read into one `Sample` type (docs/data.md).

`load("FORMAT:PATH", images=...)` reads a data set by format name (`FORMATS`): the GQA subsets
of the Cross-modal Information Flow paper (``gqa``), POPE (``pope``), ScienceQA's Hugging Face
Parquet files (``scienceqa``), TextVQA (``textvqa``), COCO captions for CHAIR (``chair``), the
zoo's synthetic shapes (``shapes:N``) and your own CSV or JSON-lines files (``csv``,
``jsonl``). Loaders read local files only and never open an image file: they check that it
exists. A row that cannot be read is a `DataError` naming the file, the row and the field, or,
with ``skip_bad=True``, is left out and its message kept in `Dataset.skipped`.

Examples:
    >>> data = mmlens.data.load("gqa:data/ChooseAttr.csv", images="gqa/images")
    >>> data[0].sample_id, data[0].question_type, data.name
    ('0123', 'ChooseAttr', 'gqa')
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmlens.data.coco import load_chair
from mmlens.data.custom import from_samples, load_csv, load_jsonl
from mmlens.data.gqa import load_gqa
from mmlens.data.pope import load_pope
from mmlens.data.sample import DataError, Dataset, Sample, shard_of
from mmlens.data.scienceqa import load_scienceqa
from mmlens.data.shapes import load_shapes
from mmlens.data.textvqa import load_textvqa

FORMATS: dict[str, Callable[..., Dataset]] = {
    "gqa": load_gqa,
    "pope": load_pope,
    "scienceqa": load_scienceqa,
    "textvqa": load_textvqa,
    "chair": load_chair,
    "shapes": load_shapes,
    "csv": load_csv,
    "jsonl": load_jsonl,
}
"""Format name (the part of a spec before ``:``) -> loader."""


def load(
    spec: str, images: str | Path | None = None, *, skip_bad: bool = False, **options: Any
) -> Dataset:
    """The data set that `spec` (``"FORMAT:PATH"``) names, read by ``FORMATS[FORMAT]``.

    `images` is the folder image names are relative to; `options` are the loader's own keyword
    arguments (``seed=`` for ``shapes`` and ``chair``, ``n_images=`` for ``chair``,
    ``question_type=`` for ``gqa``, ``image_only=`` for ``scienceqa``).

    Raises:
        ValueError: `spec` has no ``FORMAT:`` or names an unknown format (the message lists them).
        DataError: a file that cannot be read as its format says.

    Examples:
        >>> load("shapes:64", seed=1).ids[:2]
        ['shapes-1-0', 'shapes-1-1']
        >>> load("pope:pope/coco_pope_random.json", images="coco/val2014").name
        'pope'
    """
    name, colon, path = spec.partition(":")
    if not colon or name not in FORMATS:
        raise ValueError(
            f"data spec {spec!r} is not FORMAT:PATH with a known format; formats: "
            f"{', '.join(FORMATS)} (e.g. 'gqa:data/ChooseAttr.csv', 'shapes:64')"
        )
    return FORMATS[name](path, images, skip_bad=skip_bad, **options)


__all__ = [
    "FORMATS",
    "DataError",
    "Dataset",
    "Sample",
    "from_samples",
    "load",
    "load_chair",
    "load_csv",
    "load_gqa",
    "load_jsonl",
    "load_pope",
    "load_scienceqa",
    "load_shapes",
    "load_textvqa",
    "shard_of",
]
