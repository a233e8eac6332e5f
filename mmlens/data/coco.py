"""COCO captioning for CHAIR (Rohrbach et al., 2018), object hallucination in long captions: a
seeded subset of the COCO val2014 images, each with the objects its instance annotations name
(the ground truth CHAIR checks a caption's objects against) and its reference captions
(docs/data.md).

Files: the COCO annotation folder's ``instances_val2014.json`` (``images``: ``id``,
``file_name``, ...; ``annotations``: ``image_id``, ``category_id``, ...; ``categories``: ``id``,
``name``) and ``captions_val2014.json`` (``annotations``: ``image_id``, ``caption``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
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
    value_of,
)
from mmlens.data.sample import DataError, Dataset, Sample

QUESTION = "Please describe this image in detail."
"""The captioning prompt of the CHAIR evaluations of LLaVA-family models."""


def load_chair(
    path: str | Path,
    images: str | Path | None = None,
    *,
    skip_bad: bool = False,
    n_images: int | None = 500,
    seed: int = 0,
    instances: str = "instances_val2014.json",
    captions: str = "captions_val2014.json",
) -> Dataset:
    """A seeded subset of the COCO images, to be captioned and scored with CHAIR.

    - `path` is the annotation folder; `instances` and `captions` name the files in it (or
      anywhere, given as absolute paths).
    - The subset: ``random.Random(seed).sample`` of `n_images` of the ids (sorted) of the images
      that have instance annotations (all of them where there are fewer, or `n_images` is None),
      then in id order. Images left out with `skip_bad` are not replaced.
    - ``sample_id`` = ``str(image_id)``; the image is ``<images>/<file_name>`` (`images`
      defaulting to the annotation folder); ``question`` = `QUESTION`, no suffix.
    - ``metadata``: ``objects`` (sorted names of the categories annotated in the image, CHAIR's
      ground truth), ``captions`` (the reference captions, in file order), ``file_name``.
    - ``max_new_tokens`` is 512: CHAIR scores long, detailed captions.

    Errors name the entry as ``images[i]``, ``annotations[i]`` or ``categories[i]`` (from 0).

    Examples:
        >>> data = load_chair("coco/annotations", images="coco/val2014", n_images=500, seed=0)
        >>> data[0].metadata["objects"]
        ['dining table', 'person', 'pizza']
    """
    folder = Path(path)
    instances_file = data_file(folder / instances)
    content = as_object(instances_file, None, read_json(instances_file))
    names = {
        key: value_of(instances_file, row, entry, "name", str)
        for key, (row, entry) in _by_id(instances_file, content, "categories").items()
    }
    entries = _by_id(instances_file, content, "images")
    objects: dict[int, set[str]] = {}
    for row, entry in _entries(instances_file, content, "annotations"):
        image_id = value_of(instances_file, row, entry, "image_id", int)
        category = value_of(instances_file, row, entry, "category_id", int)
        if image_id not in entries or category not in names:
            field = "image_id" if image_id not in entries else "category_id"
            raise DataError(instances_file, row, field, f"{entry[field]} is not in the file")
        objects.setdefault(image_id, set()).add(names[category])
    references = _captions(data_file(folder / captions))

    ids = sorted(objects)
    if n_images is not None and n_images < len(ids):
        ids = sorted(random.Random(seed).sample(ids, n_images))
    rows = Rows(skip_bad, id_field="id")
    root = image_root(images, instances_file)
    for image_id in ids:
        row, entry = entries[image_id]
        rows.add(instances_file, row, _sample, entry, objects[image_id], references, root)
    return rows.dataset("chair", str(path), max_new_tokens=512)


def _entries(file: Path, content: dict[str, Any], key: str) -> Iterator[tuple[str, dict]]:
    """``(f"{key}[i]", entry)`` for the entries of the list ``content[key]``."""
    entries = content.get(key)
    if not isinstance(entries, list):
        raise DataError(file, None, key, "expected a list")
    for index, entry in enumerate(entries):
        row = f"{key}[{index}]"
        yield row, as_object(file, row, entry)


def _by_id(file: Path, content: dict[str, Any], key: str) -> dict[int, tuple[str, dict]]:
    """The entries of ``content[key]`` by their ``id``; an id that occurs twice is a
    `DataError` naming both entries (CHAIR's ground truth would silently take one of them)."""
    by_id: dict[int, tuple[str, dict]] = {}
    for row, entry in _entries(file, content, key):
        entry_id = value_of(file, row, entry, "id", int)
        if entry_id in by_id:
            raise DataError(
                file, row, "id", f"{key} id {entry_id} occurs twice (also {by_id[entry_id][0]})"
            )
        by_id[entry_id] = (row, entry)
    return by_id


def _captions(file: Path) -> dict[int, list[str]]:
    content = as_object(file, None, read_json(file))
    captions: dict[int, list[str]] = {}
    for row, entry in _entries(file, content, "annotations"):
        image_id = value_of(file, row, entry, "image_id", int)
        captions.setdefault(image_id, []).append(value_of(file, row, entry, "caption", str))
    return captions


def _sample(
    file: Path,
    row: Row,
    entry: dict[str, Any],
    objects: set[str],
    references: dict[int, list[str]],
    root: Path,
) -> Sample:
    file_name = value_of(file, row, entry, "file_name", str)
    return Sample(
        sample_id=str(entry["id"]),
        question=QUESTION,
        image=image_file(file, row, root, file_name),
        metadata={
            "objects": sorted(objects),
            "captions": references.get(entry["id"], []),
            "file_name": file_name,
        },
    )
