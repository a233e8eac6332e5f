"""POPE (Li et al., 2023), object-hallucination probing: yes/no questions about COCO images, one
JSON-lines file per split (``coco_pope_random.json``, ``..._popular.json``,
``..._adversarial.json``; JSON lines despite the name). Each line:
``{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in
the image?", "label": "yes"}`` (docs/data.md).
"""

from __future__ import annotations

from pathlib import Path

from mmlens.data._files import (
    Row,
    Rows,
    data_files,
    first_in_name,
    image_file,
    image_root,
    json_lines,
    json_object,
    value_of,
)
from mmlens.data.sample import DataError, Dataset, Sample

SPLITS = ("random", "popular", "adversarial")
"""POPE's three ways of drawing the absent objects; a file's split is the first in its name."""

SUFFIX = "\nAnswer the question using a single word or phrase."
"""LLaVA's POPE answer instruction."""

LABELS = ("yes", "no")


def load_pope(
    path: str | Path, images: str | Path | None = None, *, skip_bad: bool = False
) -> Dataset:
    """The questions of a POPE file, or of every ``*.json`` / ``*.jsonl`` in a folder.

    - ``sample_id`` = ``f"{split}-{question_id}"`` and ``question_type`` = the split: the first
      of `SPLITS` in the file name, else the file's stem. The splits reuse question ids, so the
      split keeps ids unique when they are loaded together.
    - ``image`` = ``<images>/<image>`` (`images` defaulting to the file's folder); ``question`` =
      ``text``; ``answer`` = ``label`` ("yes" or "no", anything else is a `DataError`);
      ``suffix`` = `SUFFIX`; ``metadata``: the other keys (``question_id``, ``image``, ...).

    Examples:
        >>> data = load_pope("pope/coco_pope_adversarial.json", images="coco/val2014")
        >>> data[0].sample_id, data[0].answer
        ('adversarial-1', 'yes')
    """
    rows = Rows(skip_bad, id_field="question_id")
    for file in data_files(path, (".json", ".jsonl")):
        split = first_in_name(file, SPLITS) or file.stem
        root = image_root(images, file)
        for line, text in json_lines(file):
            rows.add(file, line, _sample, text, split, root)
    return rows.dataset("pope", str(path), max_new_tokens=8)


def _sample(file: Path, row: Row, text: str, split: str, root: Path) -> Sample:
    record = json_object(file, row, text)
    question_id = value_of(file, row, record, "question_id", (int, str))
    label = value_of(file, row, record, "label", str)
    if label not in LABELS:
        raise DataError(file, row, "label", f"{label!r} is neither 'yes' nor 'no'")
    return Sample(
        sample_id=f"{split}-{question_id}",
        question=value_of(file, row, record, "text", str),
        image=image_file(file, row, root, value_of(file, row, record, "image", str)),
        answer=label,
        question_type=split,
        suffix=SUFFIX,
        metadata={k: v for k, v in record.items() if k not in ("text", "label")},
    )
