"""The zoo's synthetic shapes VQA (`mmlens.zoo.shapes`) as a `Dataset`: made, not read, so it
needs no file (docs/data.md)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mmlens.data.sample import Dataset, Sample
from mmlens.zoo import shapes


def load_shapes(
    path: int | str,
    images: str | Path | None = None,
    *,
    skip_bad: bool = False,
    seed: int = 0,
    question_types: Sequence[str] = shapes.QUESTION_TYPES,
) -> Dataset:
    """`path` (a count: ``"shapes:64"`` is 64 samples) samples of
    ``mmlens.zoo.shapes.generate(count, seed, question_types)``.

    ``sample_id`` = ``f"shapes-{seed}-{index}"``; ``image`` is the PIL image; ``question``,
    ``answer``, ``options``, ``question_type`` and ``boxes`` as generated, no suffix;
    ``metadata``: ``subtype``, ``seed``, ``index``. There are no files, so `images` must be None
    and `skip_bad` has nothing to skip.

    Examples:
        >>> data = load_shapes(7, seed=0)
        >>> data[0].sample_id, data[0].question, data[0].answer
        ('shapes-0-0', 'Is the star blue or red?', 'red')
    """
    if images is not None:
        raise ValueError("the shapes data set is generated: pass images=None")
    try:
        count = int(path)
    except ValueError:
        raise ValueError(f"shapes takes a sample count ('shapes:64'), got {path!r}") from None
    if count < 0:
        raise ValueError(f"shapes takes a sample count >= 0, got {count}")
    samples = [
        Sample(
            sample_id=f"shapes-{seed}-{s.index}",
            question=s.question,
            image=s.image,
            answer=s.answer,
            options=s.options,
            question_type=s.question_type,
            boxes=s.boxes,
            metadata={"subtype": s.subtype, "seed": s.seed, "index": s.index},
        )
        for s in shapes.generate(count, seed, question_types)
    ]
    return Dataset(samples, "shapes", source=f"shapes:{count} (seed {seed})", max_new_tokens=4)
