"""ScienceQA (Lu et al., 2022) in the Hugging Face Parquet layout (``derek-thomas/ScienceQA``:
``data/test-00000-of-00001-*.parquet``), asked with LLaVA's "CQM-A" prompt (docs/data.md).

Columns: ``image`` (``{"bytes": ..., "path": ...}`` or null), ``question``, ``choices`` (list of
strings), ``answer`` (index into ``choices``), ``hint`` (the context, may be empty), and
``task``, ``grade``, ``subject``, ``topic``, ``category``, ``skill``, ``lecture``, ``solution``.
"""

from __future__ import annotations

import io
import string
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from mmlens.data._files import Row, Rows, data_files, require_columns, string_list, value_of
from mmlens.data.sample import DataError, Dataset, Sample

SUFFIX = "\nAnswer with the option's letter from the given choices directly."
"""LLaVA's ScienceQA answer instruction (``model_vqa_science.py --single-pred-prompt``)."""

REQUIRED = ("image", "question", "choices", "answer")


def load_scienceqa(
    path: str | Path,
    images: str | Path | None = None,
    *,
    skip_bad: bool = False,
    image_only: bool = True,
) -> Dataset:
    """The questions of a ScienceQA Parquet file, or of every ``*.parquet`` in a folder.

    - ``question`` is LLaVA's CQM-A block (its converter's text: hint and question stripped,
      then every double space replaced by one, then the whole stripped)::

          Context: {hint}
          {question}
          A. {choices[0]}
          B. {choices[1]}

      without the ``Context:`` line where the hint is empty; ``suffix`` = `SUFFIX`.
    - ``answer`` is the letter (``"A"`` for index 0); ``options`` = ``choices``.
    - ``sample_id`` = the ``id`` column where there is one, else ``f"{stem}-{index}"`` with the
      file's stem and the row's index in the file from 0 (as ``datasets``' ``ds[index]``; error
      messages count rows from 1).
    - ``image``: a PIL image opened from the bytes in the file, which PIL decodes on first use;
      `images` must be None. With `image_only` (the default, as LLaVA's "IMG" subset), rows
      without an image are left out (not counted in ``Dataset.skipped``); else their image is
      None.
    - ``metadata``: the other columns (``hint``, ``task``, ``grade``, ``subject``, ...).

    Examples:
        >>> data = load_scienceqa("ScienceQA/data/test-00000-of-00001.parquet")
        >>> data[0].sample_id, data[0].answer, data[0].options
        ('test-00000-of-00001-0', 'B', ('milk', 'rock'))
    """
    if images is not None:
        raise ValueError("ScienceQA's images are inside its Parquet files: pass images=None")
    rows = Rows(skip_bad, id_field="id")
    for file in data_files(path, (".parquet",)):
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as error:
            raise DataError(file, None, None, f"not a readable Parquet file: {error}") from error
        require_columns(file, table.column_names, REQUIRED)
        for index, record in enumerate(table.to_pylist()):
            if image_only and record["image"] is None:
                continue
            rows.add(file, index + 1, _sample, index, record)
    return rows.dataset("scienceqa", str(path), max_new_tokens=4)


def question_block(question: str, choices: tuple[str, ...], hint: str = "") -> str:
    """LLaVA's CQM-A text of a ScienceQA question (see `load_scienceqa`).

    >>> question_block("Which is a solid?", ("milk", "rock"), hint="Pick one.")
    'Context: Pick one.\\nWhich is a solid?\\nA. milk\\nB. rock'
    """
    body = f"Context: {hint.strip()}\n{question.strip()}" if hint.strip() else question.strip()
    lines = "\n".join(f"{string.ascii_uppercase[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{body}\n{lines}".replace("  ", " ").strip()


def _sample(file: Path, row: Row, index: int, record: dict[str, Any]) -> Sample:
    question = value_of(file, row, record, "question", str)
    choices = string_list(file, row, "choices", record["choices"])
    if not 0 < len(choices) <= len(string.ascii_uppercase):
        raise DataError(file, row, "choices", f"{len(choices)} choices (1 to 26 can be lettered)")
    answer = value_of(file, row, record, "answer", int)
    if not 0 <= answer < len(choices):
        raise DataError(file, row, "answer", f"index {answer} of {len(choices)} choices")
    hint = value_of(file, row, record, "hint", str, required=False) or ""
    return Sample(
        sample_id=str(record["id"]) if "id" in record else f"{file.stem}-{index}",
        question=question_block(question, choices, hint),
        image=_image(file, row, record["image"]),
        answer=string.ascii_uppercase[answer],
        options=choices,
        suffix=SUFFIX,
        metadata={
            key: value
            for key, value in record.items()
            if key not in ("id", "image", "question", "choices", "answer")
        },
    )


def _image(file: Path, row: Row, value: Any) -> Image.Image | None:
    if value is None:
        return None
    data = value.get("bytes") if isinstance(value, dict) else None
    if not data:
        raise DataError(file, row, "image", "no image bytes (expected {'bytes': ..., 'path': ...})")
    try:
        # Image.open reads the header only: the pixels are decoded when the image is first used
        # (a sample whose pixels then fail is recorded as failed by the runner). `verify` checks
        # the file's structure (PNG's chunk checksums) without decoding it.
        Image.open(io.BytesIO(data)).verify()
        return Image.open(io.BytesIO(data))
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as error:
        raise DataError(file, row, "image", f"not a decodable image: {error}") from None
