"""Your own data: a CSV or JSON-lines file with one question per row (docs/data.md), or samples
made in Python (`from_samples`).

Fields (the `Sample` attributes of the same names):

============= ========= =========================================== ===========================
field         required  CSV cell                                    JSON-lines value
============= ========= =========================================== ===========================
sample_id     yes       text                                        string or integer
question      yes       text                                        string
image         no        path relative to `images`, or absolute      same, or null
answer        no        text                                        string or null
answers       no        ``"|"``-separated (items stripped)          list of strings
options       no        ``"|"``-separated (items stripped)          list of strings
question_type no        text                                        string or null
boxes         no        JSON text ``[[x0, y0, x1, y1], ...]``       list of ``[x0, y0, x1, y1]``
suffix        no        text                                        string
metadata      no        every column ``meta_<key>`` (as ``<key>``)  an object
============= ========= =========================================== ===========================

Boxes are integers in original-image pixels, x1 and y1 exclusive. An empty CSV cell is an
absent value. Any other column or key is a `DataError` (a misspelt column must not be dropped
silently).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from mmlens.data._files import (
    Row,
    Rows,
    csv_rows,
    data_file,
    image_file,
    image_root,
    json_lines,
    json_object,
    parse_box,
    read_csv,
    reject_unknown,
    require_columns,
    required_text,
    string_list,
    value_of,
)
from mmlens.data.sample import DataError, Dataset, Sample

REQUIRED = ("sample_id", "question")
FIELDS = REQUIRED + (
    "image",
    "answer",
    "answers",
    "options",
    "question_type",
    "boxes",
    "suffix",
)
"""The fields of a row besides metadata (``meta_*`` columns in CSV, ``metadata`` in JSON lines)."""

META_PREFIX = "meta_"


def load_csv(
    path: str | Path, images: str | Path | None = None, *, skip_bad: bool = False
) -> Dataset:
    """The samples of a CSV file in the layout of this module (name ``"custom"``).

    Every cell is read as text; images are looked up under `images` (default: the CSV's folder).

    Examples:
        >>> print(open("questions.csv").read().strip())
        sample_id,question,image,answer,options,meta_source
        q1,Is the cat black or white?,cat.jpg,black,black|white,mine
        >>> data = load_csv("questions.csv", images="pictures")
        >>> data[0].options, data[0].metadata
        (('black', 'white'), {'source': 'mine'})
    """
    file = data_file(path)
    frame = read_csv(file)
    columns = list(frame.columns)
    reject_unknown(file, None, columns, FIELDS, prefix=META_PREFIX)
    require_columns(file, columns, REQUIRED)
    rows = Rows(skip_bad)
    root = image_root(images, file)
    for row, cells in csv_rows(frame):
        rows.add(file, row, _csv_sample, cells, root)
    return rows.dataset("custom", str(path), max_new_tokens=16)


def load_jsonl(
    path: str | Path, images: str | Path | None = None, *, skip_bad: bool = False
) -> Dataset:
    """The samples of a JSON-lines file in the layout of this module (name ``"custom"``).

    Examples:
        >>> print(open("questions.jsonl").read().strip())  # doctest: +NORMALIZE_WHITESPACE
        {"sample_id": "q1", "question": "Where is the cat?", "image": "cat.jpg",
         "boxes": [[10, 20, 60, 80]], "metadata": {"source": "mine"}}
        >>> load_jsonl("questions.jsonl", images="pictures")[0].boxes
        ((10, 20, 60, 80),)
    """
    file = data_file(path)
    rows = Rows(skip_bad)
    root = image_root(images, file)
    for line, text in json_lines(file):
        rows.add(file, line, _jsonl_sample, text, root)
    return rows.dataset("custom", str(path), max_new_tokens=16)


def from_samples(
    samples: Iterable[Any],
    name: str = "custom",
    *,
    source: str | None = None,
    max_new_tokens: int = 16,
) -> Dataset:
    """A `Dataset` of samples made in Python.

    Each item is a `Sample`, or any object with a ``question`` attribute (such as a
    `mmlens.zoo.shapes.ShapesSample`): its attributes named like `Sample`'s (``image``,
    ``answer``, ``answers``, ``options``, ``question_type``, ``boxes``, ``suffix``,
    ``metadata``, ``sample_id``) are taken, others ignored; without ``sample_id``, its position
    in `samples` (``"0"``, ``"1"``, ...) is its id.

    Examples:
        >>> from mmlens.zoo.shapes import generate
        >>> data = from_samples(generate(4, seed=1), name="shapes")
        >>> data.ids
        ['0', '1', '2', '3']
    """
    return Dataset(
        (_as_sample(item, position) for position, item in enumerate(samples)),
        name,
        source=source,
        max_new_tokens=max_new_tokens,
    )


def _as_sample(item: Any, position: int) -> Sample:
    if isinstance(item, Sample):
        return item
    if not hasattr(item, "question"):
        raise TypeError(f"item {position} ({type(item).__name__}) has no 'question' attribute")
    values = {f.name: getattr(item, f.name) for f in fields(Sample) if hasattr(item, f.name)}
    values["sample_id"] = str(values.get("sample_id", position))
    for name in ("answers", "options"):
        values[name] = tuple(values.get(name, ()))
    values["boxes"] = tuple(tuple(box) for box in values.get("boxes", ()))
    values["metadata"] = dict(values.get("metadata", {}))
    return Sample(**values)


def _csv_sample(file: Path, row: Row, cells: dict[str, str], root: Path) -> Sample:
    boxes: Any = []
    if cells.get("boxes", "").strip():
        try:
            boxes = json.loads(cells["boxes"])
        except json.JSONDecodeError as error:
            raise DataError(file, row, "boxes", f"not JSON text: {error}") from None
    return _sample(
        file,
        row,
        root,
        sample_id=cells["sample_id"],
        question=cells["question"],
        image=cells.get("image") or None,
        answer=cells.get("answer") or None,
        answers=_items(cells.get("answers", "")),
        options=_items(cells.get("options", "")),
        question_type=cells.get("question_type") or None,
        boxes=boxes,
        suffix=cells.get("suffix", ""),
        metadata={
            name[len(META_PREFIX) :]: value
            for name, value in cells.items()
            if name.startswith(META_PREFIX)
        },
    )


def _jsonl_sample(file: Path, row: Row, text: str, root: Path) -> Sample:
    record = json_object(file, row, text)
    reject_unknown(file, row, list(record), FIELDS + ("metadata",))

    def optional(key: str, kind: type) -> Any:
        return value_of(file, row, record, key, kind, required=False)

    return _sample(
        file,
        row,
        root,
        sample_id=str(value_of(file, row, record, "sample_id", (str, int))),
        question=value_of(file, row, record, "question", str),
        image=optional("image", str),
        answer=optional("answer", str),
        answers=string_list(file, row, "answers", optional("answers", list) or []),
        options=string_list(file, row, "options", optional("options", list) or []),
        question_type=optional("question_type", str),
        boxes=optional("boxes", list) or [],
        suffix=optional("suffix", str) or "",
        metadata=optional("metadata", dict) or {},
    )


def _items(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split("|") if item.strip())


def _sample(
    file: Path,
    row: Row,
    root: Path,
    *,
    sample_id: str,
    question: str,
    image: str | None,
    boxes: Any,
    **rest: Any,
) -> Sample:
    """The sample of one row once its cells are values: checks what both layouts share."""
    if not isinstance(boxes, list):
        raise DataError(file, row, "boxes", f"expected a list of boxes, got {boxes!r}")
    return Sample(
        sample_id=required_text(file, row, "sample_id", sample_id),
        question=required_text(file, row, "question", question),
        image=image_file(file, row, root, image) if image else None,
        boxes=tuple(parse_box(file, row, "boxes", box) for box in boxes),
        **rest,
    )
