"""One sample type for every data set, and the data set that holds them (docs/data.md).

A `Sample` names its image (a local path, read only when `load_image` is called, or an image
object), its question and references, boxes in original-image pixels and the data set's answer
instruction. A `Dataset` is an ordered, immutable list of samples with unique `sample_id`s that
can be filtered, sliced and sharded; sharding is by a hash of `sample_id`, so every process of a
data-parallel run gets the same split whatever the order it read the file in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from mmlens.inputs.images import as_image

Box = tuple[int, int, int, int]


class DataError(ValueError):
    """A data file that cannot be read as its format says: names the file, the row and the field.

    Examples:
        >>> raise DataError("gqa/ChooseAttr.csv", 12, "object1 x", "'abc' is not a number")
        Traceback (most recent call last):
        mmlens.data.sample.DataError: gqa/ChooseAttr.csv, row 12, field 'object1 x': 'abc' is not a number
    """

    def __init__(self, file: str | Path, row: int | str | None, field: str | None, problem: str):
        self.file, self.row, self.field, self.problem = str(file), row, field, problem
        where = [self.file]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {problem}")


@dataclass(frozen=True)
class Sample:
    """One question about one image (or none).

    Attributes:
        sample_id: stable id, unique in its data set (e.g. GQA's ``question_id``, leading zeros
            kept); results and resumption key on it.
        question: the question text alone (no conversation template, no answer instruction).
        image: a local path (read lazily by `load_image`), an image object, or None.
        answer: the reference answer (GQA's word, POPE's "yes"/"no", ScienceQA's option letter).
        answers: every reference answer where there are several (TextVQA's ten).
        options: answer options in order (ScienceQA's choices, GQA's true/false options).
        question_type: the data set's category (GQA's ChooseAttr, ..., POPE's split).
        boxes: ``(x0, y0, x1, y1)`` boxes in original-image pixels (x1, y1 exclusive) of the
            objects the question is about.
        suffix: the data set's answer instruction, which follows the question in the user's
            turn but is not part of the `question` segment ("" for none).
        metadata: anything else the file holds (image id, object names, ...).
    """

    sample_id: str
    question: str
    image: str | Path | Image.Image | None = None
    answer: str | None = None
    answers: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    question_type: str | None = None
    boxes: tuple[Box, ...] = ()
    suffix: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def load_image(self) -> Image.Image | None:
        """The image as the processors read it (`mmlens.inputs.images.as_image`), or None.

        Raises:
            FileNotFoundError: the image file does not exist (the message names it).
        """
        return None if self.image is None else as_image(self.image)


class Dataset(Sequence[Sample]):
    """An ordered, immutable collection of samples with unique ids.

    Args:
        samples: the samples, in order.
        name: the data set's format name (``"gqa"``, ``"pope"``, ...), which picks its metric.
        source: where it was read from (recorded in run manifests).
        max_new_tokens: how many tokens to generate when the data set is scored by generation.
        skipped: the errors of the rows left out with ``skip_bad=True`` (`DataError` messages).

    Examples:
        >>> data = mmlens.data.load("pope:pope/coco_pope_random.json", images="coco/val2014")
        >>> data.filter(lambda s: s.answer == "yes")[:100].ids
        ['random-1']
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        name: str = "custom",
        *,
        source: str | None = None,
        max_new_tokens: int = 16,
        skipped: Sequence[str] = (),
    ):
        self._samples = tuple(samples)
        self.name, self.source, self.max_new_tokens = name, source, max_new_tokens
        self.skipped = tuple(skipped)
        seen: set[str] = set()
        for sample in self._samples:
            if not isinstance(sample, Sample):
                raise TypeError(f"a Dataset holds Sample objects, got {type(sample).__name__}")
            if sample.sample_id in seen:
                raise ValueError(
                    f"sample_id {sample.sample_id!r} occurs twice in data set {name!r}; ids must "
                    "be unique (results and resumption key on them)"
                )
            seen.add(sample.sample_id)

    def _with(self, samples: Iterable[Sample]) -> Dataset:
        return Dataset(
            samples,
            self.name,
            source=self.source,
            max_new_tokens=self.max_new_tokens,
            skipped=self.skipped,
        )

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return self._with(self._samples[index])
        return self._samples[index]

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} samples, source={self.source!r})"

    @property
    def ids(self) -> list[str]:
        return [sample.sample_id for sample in self._samples]

    def filter(self, keep: Callable[[Sample], bool]) -> Dataset:
        """The samples for which `keep(sample)` is true, in order."""
        return self._with(sample for sample in self._samples if keep(sample))

    def select(self, sample_ids: Iterable[str]) -> Dataset:
        """The samples with these ids, in the data set's order."""
        wanted = set(sample_ids)
        return self.filter(lambda sample: sample.sample_id in wanted)

    def shard(self, index: int, count: int) -> Dataset:
        """The samples of shard `index` of `count`: those whose `shard_of(sample_id, count)` is
        `index`. The shards partition the data set, whatever its order.

        Examples:
            >>> data = mmlens.data.load("shapes:64")
            >>> parts = [data.shard(rank, 4) for rank in range(4)]
            >>> sorted(sum((p.ids for p in parts), [])) == sorted(data.ids)
            True
        """
        if not 0 <= index < count:
            raise ValueError(f"shard {index} of {count} does not exist (0 <= index < count)")
        return self.filter(lambda sample: shard_of(sample.sample_id, count) == index)


def shard_of(sample_id: str, count: int) -> int:
    """The shard (of `count`) that `sample_id` belongs to: a stable hash, the same in every
    process and on every machine (Python's `hash` is salted per process)."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count
