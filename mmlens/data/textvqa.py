"""TextVQA (Singh et al., 2019) in its published layout (``TextVQA_0.5.1_val.json``): a JSON
object whose ``data`` list holds one entry per question: ``question_id``, ``question``,
``image_id``, ``answers`` (ten annotators' answers), and ``image_width``, ``image_height``,
``ocr_tokens``, ... (docs/data.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mmlens.data._files import (
    Row,
    Rows,
    as_object,
    data_file,
    image_file,
    image_root,
    read_json,
    string_list,
    value_of,
)
from mmlens.data.sample import DataError, Dataset, Sample

SUFFIX = "\nAnswer the question using a single word or phrase."
"""LLaVA's TextVQA answer instruction."""


def load_textvqa(
    path: str | Path, images: str | Path | None = None, *, skip_bad: bool = False
) -> Dataset:
    """The questions of a TextVQA annotation file.

    - ``sample_id`` = ``str(question_id)``; the image is ``<images>/<image_id>.jpg`` (`images`
      defaulting to the file's folder; TextVQA's ``train_images``).
    - ``answers`` = the annotators' answers as given; ``answer`` = the most common of them (ties
      go to the one listed first); an entry without ``answers`` (the test split) has neither.
    - ``suffix`` = `SUFFIX`; ``metadata``: the other keys (``image_id``, ``ocr_tokens``, ...).

    Errors name the entry as ``data[i]`` (its index in the list, from 0).

    Examples:
        >>> data = load_textvqa("TextVQA_0.5.1_val.json", images="textvqa/train_images")
        >>> data[0].answer, len(data[0].answers)
        ('dakota', 10)
    """
    file = data_file(path)
    content = as_object(file, None, read_json(file))
    entries = content.get("data")
    if not isinstance(entries, list):
        raise DataError(file, None, "data", "expected a list of questions under 'data'")
    rows = Rows(skip_bad, id_field="question_id")
    root = image_root(images, file)
    for index, entry in enumerate(entries):
        rows.add(file, f"data[{index}]", _sample, entry, root)
    return rows.dataset("textvqa", str(path), max_new_tokens=16)


def _sample(file: Path, row: Row, entry: Any, root: Path) -> Sample:
    record = as_object(file, row, entry)
    image_id = value_of(file, row, record, "image_id", str)
    answers = record.get("answers")
    answers = () if answers is None else string_list(file, row, "answers", answers)
    return Sample(
        sample_id=str(value_of(file, row, record, "question_id", (int, str))),
        question=value_of(file, row, record, "question", str),
        image=image_file(file, row, root, f"{image_id}.jpg"),
        answer=Counter(answers).most_common(1)[0][0] if answers else None,
        answers=answers,
        suffix=SUFFIX,
        metadata={
            k: v for k, v in record.items() if k not in ("question_id", "question", "answers")
        },
    )
