"""What every loader needs to read its files: which files a path names, CSV and JSON records,
typed fields, integers, boxes and image paths, each failing with a `DataError` that names the
file, the row and the field; and `Rows`, which gathers the samples and, with ``skip_bad``, leaves
a bad row out and keeps its message for `Dataset.skipped`.

Rows are counted as the messages say: the n-th data row of a CSV or Parquet file (header not
counted, from 1), the line number of a JSON-lines file, and ``key[i]`` (from 0) in a JSON list.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from mmlens.data.sample import Box, DataError, Dataset, Sample

Row = int | str | None


def data_files(path: str | Path, suffixes: Sequence[str]) -> list[Path]:
    """`path` itself, or, where `path` is a folder, its files with one of `suffixes`, sorted.

    Raises:
        FileNotFoundError: `path` does not exist, or the folder holds no such file.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.suffix in suffixes)
        if not files:
            wanted = ", ".join(f"*{suffix}" for suffix in suffixes)
            raise FileNotFoundError(f"folder {path} holds no {wanted} files")
        return files
    return [data_file(path)]


def data_file(path: str | Path) -> Path:
    """`path`, which must be a file (formats that are one file, such as TextVQA's JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (or is not a file)")
    return path


def first_in_name(file: Path, names: Sequence[str]) -> str | None:
    """The first of `names` that occurs in the file's stem (GQA's question type, POPE's split)."""
    return next((name for name in names if name in file.stem), None)


def image_root(images: str | Path | None, data_file: Path) -> Path:
    """The folder image names are relative to: `images`, else the data file's own folder."""
    return Path(images) if images is not None else data_file.parent


def image_file(file: Path, row: Row, root: Path, name: str) -> Path:
    """``root / name``, checked to exist (the image itself is not opened)."""
    path = root / name
    if not path.is_file():
        raise DataError(file, row, "image", f"image file {path} does not exist")
    return path


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
"""The extensions `image_by_id` tries (lower or upper case) for an image named by its id."""


def image_by_id(file: Path, row: Row, root: Path, image_id: str) -> Path:
    """The one image file of `image_id` under `root`: ``root / image_id`` where the id already
    names a file with one of `IMAGE_EXTENSIONS`, else ``root / (image_id + extension)`` for the
    one extension that exists. None, or several (``1.jpg`` and ``1.png``), is a `DataError`
    that names the files looked for or found.

    >>> image_by_id(Path("q.csv"), 1, Path("/nowhere"), "n1")
    Traceback (most recent call last):
    ...
    mmlens.data.sample.DataError: q.csv, row 1, field 'image': no image file for id 'n1' in /nowhere (looked for n1.jpg, n1.jpeg, n1.png, n1.webp, upper case too)
    """
    named = root / image_id
    if named.suffix.lower() in IMAGE_EXTENSIONS and named.is_file():
        return named
    extensions = [*IMAGE_EXTENSIONS, *(extension.upper() for extension in IMAGE_EXTENSIONS)]
    found = [
        root / f"{image_id}{ext}" for ext in extensions if (root / f"{image_id}{ext}").is_file()
    ]
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise DataError(
            file, row, "image", f"several images for id {image_id!r} in {root} ({names}); "
            "keep one, or name the file with its extension"
        )  # fmt: skip
    if not found:
        tried = ", ".join(f"{image_id}{ext}" for ext in IMAGE_EXTENSIONS)
        raise DataError(
            file, row, "image",
            f"no image file for id {image_id!r} in {root} (looked for {tried}, upper case too)",
        )  # fmt: skip
    return found[0]


def read_csv(file: Path) -> pd.DataFrame:
    """Every cell as written (strings; an empty or missing cell is ``""``, never NaN), so that
    ids keep their leading zeros and "NA" stays a word."""
    errors = (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError)
    try:
        with warnings.catch_warnings():
            # A row with more cells than the header: by default pandas would take the first
            # column as an index (shifting every cell), with index_col=False it drops the extra
            # cells with only a warning. Either way the row is misread: make it an error.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            return pd.read_csv(file, dtype=str, keep_default_na=False, index_col=False)
    except (*errors, UnicodeDecodeError) as error:
        raise DataError(file, None, None, f"not a readable CSV file: {error}") from error


def csv_rows(frame: pd.DataFrame) -> Iterator[tuple[int, dict[str, str]]]:
    """``(row, cells)`` of every data row, rows counted from 1."""
    return enumerate(frame.to_dict("records"), start=1)


def require_columns(file: Path, columns: Sequence[str], required: Sequence[str]) -> None:
    """A `DataError` (row None) naming the first of `required` that is not among `columns`."""
    for name in required:
        if name not in columns:
            raise DataError(
                file, None, name, f"required column missing; the header has {list(columns)}"
            )


def reject_unknown(
    file: Path, row: Row, names: Sequence[str], allowed: Sequence[str], prefix: str | None = None
) -> None:
    """A `DataError` naming the first of `names` that is neither `allowed` nor starts with
    `prefix` (a typo in a column name must not silently drop data)."""
    for name in names:
        if name not in allowed and not (prefix and name.startswith(prefix)):
            extra = f", and any name starting with {prefix!r}" if prefix else ""
            raise DataError(file, row, name, f"unknown field; allowed: {list(allowed)}{extra}")


def required_text(file: Path, row: Row, field: str, value: str) -> str:
    """`value`, which must not be empty or blank."""
    if not value.strip():
        raise DataError(file, row, field, "empty")
    return value


def parse_int(file: Path, row: Row, field: str, text: str) -> int:
    """An integer written as ``"12"`` or ``"12.0"``; anything else (``"12.5"``, ``"abc"``,
    ``"nan"``) is a `DataError`."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise DataError(file, row, field, f"{text!r} is not a number") from None
    if not number.is_integer():
        raise DataError(file, row, field, f"{text!r} is not an integer")
    return int(number)


def parse_box(file: Path, row: Row, field: str, value: Any) -> Box:
    """``[x0, y0, x1, y1]`` (integers, x1 and y1 exclusive, non-empty) as a `Box`."""
    if not (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise DataError(file, row, field, f"a box is [x0, y0, x1, y1] (integers), got {value!r}")
    x0, y0, x1, y1 = value
    if x0 >= x1 or y0 >= y1:
        raise DataError(file, row, field, f"box {value} is empty (x0 < x1 and y0 < y1 needed)")
    return (x0, y0, x1, y1)


def read_json(file: Path) -> Any:
    """The JSON value the file holds."""
    try:
        with open(file, encoding="utf-8") as stream:
            return json.load(stream)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(file, None, None, f"not valid JSON: {error}") from error
    except RecursionError:
        raise DataError(file, None, None, "not readable JSON: nested too deeply") from None


def json_lines(file: Path) -> Iterator[tuple[int, str | bytes]]:
    """``(line number, text)`` of every non-blank line of a JSON-lines file; a line that is not
    UTF-8 comes as its bytes, which `json_object` reports as that row's error (so that
    ``skip_bad`` can leave it out)."""
    with open(file, "rb") as stream:
        for number, raw in enumerate(stream, start=1):
            try:
                line: str | bytes = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw
            if line.strip():
                yield number, line


def json_object(file: Path, row: Row, text: str | bytes) -> dict[str, Any]:
    """One line of a JSON-lines file, which must hold a JSON object (UTF-8, and not nested
    past Python's recursion limit)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(file, row, None, f"not UTF-8 text: {error}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(file, row, None, f"not valid JSON: {error}") from None
    except RecursionError:
        raise DataError(file, row, None, "not readable JSON: nested too deeply") from None
    return as_object(file, row, value)


def as_object(file: Path, row: Row, value: Any) -> dict[str, Any]:
    """`value`, which must be a JSON object."""
    if not isinstance(value, dict):
        raise DataError(file, row, None, f"expected a JSON object, got {type(value).__name__}")
    return value


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object"}


def value_of(
    file: Path,
    row: Row,
    record: Mapping[str, Any],
    key: str,
    kinds: type | tuple[type, ...],
    *,
    required: bool = True,
) -> Any:
    """``record[key]`` (of a JSON object or a Parquet row), of one of the types `kinds` (a bool is
    not an integer); None where the key is absent or null and not `required`."""
    value = record.get(key)
    if value is None:
        if required:
            raise DataError(file, row, key, "missing")
        return None
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        expected = " or ".join(_KIND_NAMES[kind] for kind in kinds)
        raise DataError(file, row, key, f"expected {expected}, got {value!r}")
    return value


def string_list(file: Path, row: Row, field: str, value: Any) -> tuple[str, ...]:
    """`value`, which must be a list of strings, as a tuple."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataError(file, row, field, f"expected a list of strings, got {value!r}")
    return tuple(value)


class Rows:
    """The samples of a data set, gathered row by row in order.

    `add` makes a row's sample; a `DataError` while making it (or a sample id seen before) is
    raised, or, with `skip_bad`, the row is left out and the message kept for `Dataset.skipped`.

    Examples:
        >>> rows = Rows(skip_bad=True)
        >>> rows.add(Path("a.csv"), 1, lambda file, row: Sample("1", "Why?"))
        >>> rows.dataset("custom", "a.csv", max_new_tokens=16).ids
        ['1']
    """

    def __init__(self, skip_bad: bool, id_field: str = "sample_id"):
        self.skip_bad, self.id_field = skip_bad, id_field
        self._samples: list[Sample] = []
        self._skipped: list[str] = []
        self._seen: set[str] = set()

    def add(self, file: Path, row: Row, make: Callable[..., Sample], *args: Any) -> None:
        """Add ``make(file, row, *args)``."""
        try:
            sample = make(file, row, *args)
            if sample.sample_id in self._seen:
                raise DataError(file, row, self.id_field, f"id {sample.sample_id!r} occurs twice")
        except DataError as error:
            if not self.skip_bad:
                raise
            self._skipped.append(str(error))
            return
        self._seen.add(sample.sample_id)
        self._samples.append(sample)

    def dataset(self, name: str, source: str, *, max_new_tokens: int) -> Dataset:
        """The samples gathered so far, as a `Dataset`."""
        return Dataset(
            self._samples,
            name,
            source=source,
            max_new_tokens=max_new_tokens,
            skipped=self._skipped,
        )
