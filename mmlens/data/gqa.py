"""The GQA subsets of *Cross-modal Information Flow in Multimodal Large Language Models*
(Zhang et al., 2025): one CSV per question type (docs/data.md).

Columns: ``question_id``, ``img_id``, ``question``, ``answer`` (required); ``image_w``,
``image_h`` (required where the file has boxes); ``true option``, ``false option``,
``<object> name``; and, per object, ``<object> x``, ``<object> y``, ``<object> w``,
``<object> h`` (GQA's pixel box), where ``<object>`` is ``object1``, ``object2``,
``central object``, ...: every prefix with all four columns is an object. ``-`` (or an empty
cell) in all four marks an object the question does not have.
"""

from __future__ import annotations

from pathlib import Path

from mmlens.data._files import (
    Row,
    Rows,
    csv_rows,
    data_files,
    first_in_name,
    image_by_id,
    image_root,
    parse_int,
    read_csv,
    require_columns,
    required_text,
)
from mmlens.data.sample import Box, DataError, Dataset, Sample
from mmlens.inputs.geometry import box_from_xywh
from mmlens.inputs.templates import CROSS_MODAL_SUFFIX

QUESTION_TYPES = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")
"""The paper's six question types, each a CSV whose name holds it (e.g. ``ChooseAttr.csv``)."""

REQUIRED = ("question_id", "img_id", "question", "answer")
BOX_PARTS = ("x", "y", "w", "h")
ABSENT = ("-", "")
"""How a cell says that the question has no such object (or no such option)."""


def load_gqa(
    path: str | Path,
    images: str | Path | None = None,
    *,
    skip_bad: bool = False,
    question_type: str | None = None,
) -> Dataset:
    """The samples of one GQA CSV of the Cross-modal paper, or of every ``*.csv`` in a folder.

    - ``sample_id`` is ``question_id`` as written (leading zeros kept); the image is
      ``<images>/<img_id>`` with whichever of ``.jpg``, ``.jpeg``, ``.png``, ``.webp`` exists
      (`image_by_id`; ``img_id`` as is where it already ends in one), `images` defaulting to
      the CSV's folder.
    - ``question_type`` is the first of `QUESTION_TYPES` that occurs in the file name (None if
      none does); an explicit `question_type` overrides it for every file.
    - ``boxes``: one per object present, in column order, `box_from_xywh` of its
      ``x, y, w, h`` (the paper paints ``w + 1`` by ``h + 1`` pixels), then clipped to the image
      (``0 <= x0 < x1 <= image_w``, same for y): a box that touches the right or bottom edge would
      otherwise end one pixel outside the image.
    - ``options`` = ``(true option, false option)`` when the file gives both; ``suffix`` =
      `CROSS_MODAL_SUFFIX`; ``metadata``: every other column (``img_id``, ``image_w`` and
      ``image_h`` as ints, object names, options).

    Examples:
        >>> data = load_gqa("data/ChooseAttr.csv", images="gqa/images")
        >>> data[0].sample_id, data[0].question_type, data[0].boxes   # central object, object1
        ('0123', 'ChooseAttr', ((10, 20, 16, 24), (12, 0, 100, 80)))
    """
    rows = Rows(skip_bad, id_field="question_id")
    for file in data_files(path, (".csv",)):
        frame = read_csv(file)
        columns = list(frame.columns)
        prefixes = box_prefixes(columns)
        require_columns(file, columns, REQUIRED + (("image_w", "image_h") if prefixes else ()))
        kind = question_type or first_in_name(file, QUESTION_TYPES)
        root = image_root(images, file)
        for row, cells in csv_rows(frame):
            rows.add(file, row, _sample, cells, prefixes, kind, root)
    return rows.dataset("gqa", str(path), max_new_tokens=8)


def box_prefixes(columns: list[str]) -> list[str]:
    """The objects of a header: every ``<prefix>`` with all of ``<prefix> x/y/w/h``, in order.

    >>> box_prefixes(["question", "object1 x", "object1 y", "object1 w", "object1 h"])
    ['object1']
    """
    candidates = [column[: -len(" x")] for column in columns if column.endswith(" x")]
    return [p for p in candidates if all(f"{p} {part}" in columns for part in BOX_PARTS)]


def _sample(
    file: Path,
    row: Row,
    cells: dict[str, str],
    prefixes: list[str],
    question_type: str | None,
    root: Path,
) -> Sample:
    img_id = required_text(file, row, "img_id", cells["img_id"])
    image = image_by_id(file, row, root, img_id)
    box_columns = {f"{p} {part}" for p in prefixes for part in BOX_PARTS}
    metadata: dict[str, object] = {
        column: value
        for column, value in cells.items()
        if column not in ("question_id", "question", "answer") and column not in box_columns
    }
    size = None
    if "image_w" in cells and "image_h" in cells:
        size = tuple(parse_int(file, row, name, cells[name]) for name in ("image_w", "image_h"))
        metadata["image_w"], metadata["image_h"] = size
    return Sample(
        sample_id=required_text(file, row, "question_id", cells["question_id"]),
        question=required_text(file, row, "question", cells["question"]),
        image=image,
        answer=cells["answer"] or None,
        options=_options(file, row, cells),
        question_type=question_type,
        boxes=tuple(box for p in prefixes if (box := _box(file, row, cells, p, size)) is not None),
        suffix=CROSS_MODAL_SUFFIX,
        metadata=metadata,
    )


def _box(
    file: Path, row: Row, cells: dict[str, str], prefix: str, size: tuple[int, ...] | None
) -> Box | None:
    names = [f"{prefix} {part}" for part in BOX_PARTS]
    absent = [cells[name].strip() in ABSENT for name in names]
    if all(absent):
        return None
    if any(absent):
        name = names[absent.index(True)]
        raise DataError(file, row, name, "'-' here but not in all four box columns of the object")
    x, y, w, h = (parse_int(file, row, name, cells[name]) for name in names)
    assert size is not None  # box columns make image_w and image_h required
    width, height = size
    x0, y0, x1, y1 = box_from_xywh(x, y, w, h)
    clipped = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
        raise DataError(
            file, row, names[0], f"box {x, y, w, h} lies outside the {width}x{height} image"
        )
    return clipped


def _options(file: Path, row: Row, cells: dict[str, str]) -> tuple[str, ...]:
    names = ("true option", "false option")
    given = [cells.get(name, "").strip() not in ABSENT for name in names]
    if given[0] != given[1]:
        missing = names[given.index(False)]
        raise DataError(file, row, missing, "one option given without the other")
    return tuple(cells[name] for name in names) if all(given) else ()
