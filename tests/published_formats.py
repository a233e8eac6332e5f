"""Small files in the data sets' published layouts: the writers `tests/test_data.py` builds its
fixtures with, and `build_workspace`, the folder the docstring examples run in
(`tests/test_docstrings.py`), with a file at every path an example names."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mmlens.zoo.shapes import generate


def save_image(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as stream:
        csv.writer(stream).writerows([header, *rows])
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


GQA_HEADER = [
    "question_id", "img_id", "question", "answer", "true option", "false option",
    "object1 name", "object2 name", "image_w", "image_h",
    "central object x", "central object y", "central object w", "central object h",
    "object1 x", "object1 y", "object1 w", "object1 h",
    "object2 x", "object2 y", "object2 w", "object2 h",
]  # fmt: skip
GQA_ROWS = [
    # central object (10, 20, 5, 3); object1 ends past the right edge; object2 absent.
    ["0123", "2354786", "Is the door wood or metal?", "wood", "wood", "metal",
     "door", "-", "100", "80", "10", "20", "5", "3", "12.0", "0", "88", "79",
     "-", "-", "-", "-"],
    ["07", "2368341", "What color is the car?", "red", "-", "-",
     "car", "-", "50", "40", "-", "-", "-", "-", "1", "2", "3", "4", "-", "-", "-", "-"],
]  # fmt: skip


def scienceqa_table(rows: list[dict]) -> pa.Table:
    """A table with the Hugging Face ScienceQA schema."""
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("question", pa.string()),
            ("choices", pa.list_(pa.string())),
            ("answer", pa.int8()),
            ("hint", pa.string()),
            ("task", pa.string()),
            ("grade", pa.string()),
            ("subject", pa.string()),
            ("topic", pa.string()),
            ("category", pa.string()),
            ("skill", pa.string()),
            ("lecture", pa.string()),
            ("solution", pa.string()),
        ]
    )
    extra = {key: "" for key in ("task", "grade", "topic", "category", "skill", "lecture")}
    return pa.Table.from_pylist(
        [{**extra, "subject": "natural science", "solution": "", **row} for row in rows], schema
    )


CUSTOM_HEADER = ["sample_id", "question", "image", "answer", "answers", "options",
                 "question_type", "boxes", "suffix", "meta_source"]  # fmt: skip


def build_workspace(root: Path) -> Path:
    """`root` filled with the files the docstring examples read, at the paths they name:
    the Cross-modal paper's GQA CSVs and images, the POPE splits over COCO val2014 images, COCO's
    annotation files, the ScienceQA Parquet file, TextVQA's JSON, a questions CSV / JSON-lines pair
    of your own, and finished runs of tiny-shapes on 14 shapes samples in ``runs/cliff``,
    ``runs/knockout`` (window 3), ``runs/lens`` and ``runs/truncation``."""
    shapes = generate(4, seed=0)
    rows = [list(row) for row in GQA_ROWS]
    for row, sample in zip(rows, shapes, strict=False):
        sample.image.save(_parent(root / "gqa" / "images" / f"{row[1]}.jpg"))
    for name in ("ChooseAttr", "ChooseRel"):
        write_csv(root / "data" / f"{name}.csv", GQA_HEADER, rows)

    names = ["COCO_val2014_000000310196.jpg", "COCO_val2014_000000210789.jpg"]
    for name, sample in zip(names, shapes, strict=False):
        sample.image.save(_parent(root / "coco" / "val2014" / name))
    questions = [(1, names[0], "Is there a star in the image?"), (2, names[1], "Is there a cat?")]
    for split in ("random", "popular", "adversarial"):
        records = [
            {"question_id": question_id, "image": name, "text": text, "label": label}
            for (question_id, name, text), label in zip(questions, ("yes", "no"), strict=True)
        ]
        write_jsonl(root / "pope" / f"coco_pope_{split}.json", records)
    write_coco_annotations(root / "coco" / "annotations", names)

    write_scienceqa(root / "ScienceQA" / "data" / "test-00000-of-00001.parquet")

    write_textvqa(root / "TextVQA_0.5.1_val.json", root / "textvqa" / "train_images")

    shapes[0].image.save(_parent(root / "pictures" / "cat.jpg"))
    write_csv(
        root / "questions.csv",
        ["sample_id", "question", "image", "answer", "options", "meta_source"],
        [["q1", "Is the cat black or white?", "cat.jpg", "black", "black|white", "mine"]],
    )
    write_jsonl(
        root / "questions.jsonl",
        [{"sample_id": "q1", "question": "Where is the cat?", "image": "cat.jpg",
          "boxes": [[10, 20, 60, 80]], "metadata": {"source": "mine"}}],
    )  # fmt: skip

    import mmlens

    model = mmlens.load("tiny-shapes")
    for experiment, options in {
        "cliff": {},
        "knockout": {"window_size": 3},
        "logit-lens": {},
        "truncation": {"layers": [2], "keep": 16},
    }.items():
        name = experiment.split("-")[-1]
        mmlens.run(
            experiment, model, "shapes:14", out=root / "runs" / name, progress=False, **options
        )
    return root


def write_scienceqa(file: Path) -> Path:
    """Two ScienceQA rows in the Hugging Face Parquet layout: one with an image, one text-only."""
    png = io.BytesIO()
    generate(1, seed=0)[0].image.save(png, format="PNG")
    rows = [
        {"image": {"bytes": png.getvalue(), "path": None}, "question": "Which is a solid?",
         "choices": ["milk", "rock"], "answer": 1, "hint": "Pick  one. "},
        {"image": None, "question": "Which word is a noun?", "choices": ["run", "cup", "blue"],
         "answer": 1, "hint": ""},
    ]  # fmt: skip
    pq.write_table(scienceqa_table(rows), _parent(file))
    return file


def write_textvqa(file: Path, images: Path) -> Path:
    """TextVQA's JSON with two questions about one image (saved in `images`): the first with the
    ten annotators' answers of a published question, the second a tie."""
    save_image(images / "003a8ae2ef43b901.jpg")
    entries = [
        {"question": "what is the brand of this camera?", "image_id": "003a8ae2ef43b901",
         "image_classes": ["Camera"], "image_width": 1024, "image_height": 664,
         "answers": ["nous les gosses", "dakota", "clos culombu", "dakota digital"]
         + ["nous les gosses"] * 2 + ["dakota"] * 2 + ["dakota digital", "dakota"],
         "question_tokens": ["what", "is"], "question_id": 34602,
         "ocr_tokens": ["MIX", "dakota"], "set_name": "val"},
        {"question": "tie?", "image_id": "003a8ae2ef43b901", "question_id": 34603,
         "answers": ["b", "a", "a", "b"]},
    ]  # fmt: skip
    _parent(file).write_text(json.dumps({"dataset_name": "textvqa", "data": entries}))
    return file


def write_coco_annotations(folder: Path, file_names: list[str]) -> Path:
    """COCO's ``instances_val2014.json`` and ``captions_val2014.json`` for images named
    `file_names` (ids 1, 2, ...): a person, a pizza and a dining table in each, one caption per
    image."""
    images = [
        {"id": i, "file_name": name, "height": 112, "width": 112}
        for i, name in enumerate(file_names, 1)
    ]
    categories = [
        {"id": 1, "name": "person"}, {"id": 59, "name": "pizza"}, {"id": 67, "name": "dining table"}
    ]  # fmt: skip
    annotations = [
        {"id": 10 * image["id"] + category["id"], "image_id": image["id"],
         "category_id": category["id"], "bbox": [0, 0, 2, 2]}
        for image in images for category in categories
    ]  # fmt: skip
    captions = [
        {"id": image["id"], "image_id": image["id"], "caption": "A man eating pizza at a table."}
        for image in images
    ]
    _parent(folder / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    (folder / "captions_val2014.json").write_text(json.dumps({"annotations": captions}))
    return folder


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
