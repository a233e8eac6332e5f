"""The data loaders (mmlens.data) on small files written in exactly the published layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from published_formats import (
    CUSTOM_HEADER,
    GQA_HEADER,
    GQA_ROWS,
    save_image,
    scienceqa_table,
    write_csv,
    write_jsonl,
    write_scienceqa,
    write_textvqa,
)

from mmlens.data import (
    FORMATS,
    DataError,
    Sample,
    from_samples,
    load,
    load_chair,
    load_csv,
    load_gqa,
    load_jsonl,
    load_pope,
    load_scienceqa,
    load_shapes,
    load_textvqa,
)
from mmlens.inputs.templates import CROSS_MODAL_SUFFIX
from mmlens.zoo.shapes import generate

POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


# --- GQA (Cross-modal Information Flow) ------------------------------------------------------


@pytest.fixture
def gqa(tmp_path: Path) -> tuple[Path, Path]:
    """(CSV named like the paper's files, image folder)."""
    images = tmp_path / "images"
    for row in GQA_ROWS:
        save_image(images / f"{row[1]}.jpg")
    return write_csv(tmp_path / "llava_v1_5_7b_ChooseAttr.csv", GQA_HEADER, GQA_ROWS), images


def test_gqa_reads_the_published_columns(gqa):
    file, images = gqa
    data = load_gqa(file, images)
    assert (data.name, data.max_new_tokens, data.ids) == ("gqa", 8, ["0123", "07"])
    first, second = data
    assert first.image == images / "2354786.jpg"
    assert (first.question, first.answer) == ("Is the door wood or metal?", "wood")
    assert first.question_type == second.question_type == "ChooseAttr"
    assert first.options == ("wood", "metal") and second.options == ()
    # (x, y, x + w + 1, y + h + 1); object1's x1 = 12 + 88 + 1 = 101 is clipped to image_w.
    assert first.boxes == ((10, 20, 16, 24), (12, 0, 100, 80))
    assert second.boxes == ((1, 2, 5, 7),)
    assert first.suffix == CROSS_MODAL_SUFFIX
    assert first.metadata["img_id"] == "2354786" and first.metadata["image_w"] == 100
    assert first.metadata["object1 name"] == "door"
    assert first.metadata["true option"] == "wood"


def test_gqa_question_type_from_the_name_or_the_option(gqa, tmp_path):
    file, images = gqa
    other = write_csv(tmp_path / "misc.csv", GQA_HEADER, GQA_ROWS)
    assert load_gqa(other, images)[0].question_type is None
    assert load_gqa(other, images, question_type="QueryAttr")[0].question_type == "QueryAttr"
    folder = tmp_path / "subsets"
    write_csv(folder / "CompareAttr.csv", GQA_HEADER, GQA_ROWS[:1])
    write_csv(folder / "LogicalObj.csv", GQA_HEADER, [["9", *GQA_ROWS[1][1:]]])
    data = load_gqa(folder, images)
    assert [(s.sample_id, s.question_type) for s in data] == [
        ("0123", "CompareAttr"),
        ("9", "LogicalObj"),
    ]


@pytest.mark.parametrize(
    ("column", "value", "problem"),
    [
        ("object1 x", "abc", "not a number"),
        ("object1 w", "12.5", "not an integer"),
        ("central object h", "-", "all four"),
        ("false option", "-", "one option given"),
    ],
)
def test_gqa_bad_cells_name_file_row_and_field(gqa, column, value, problem):
    file, images = gqa
    rows = [list(row) for row in GQA_ROWS]
    rows[0][GQA_HEADER.index(column)] = value
    write_csv(file, GQA_HEADER, rows)
    with pytest.raises(DataError, match=problem) as error:
        load_gqa(file, images)
    assert (error.value.file, error.value.row, error.value.field) == (str(file), 1, column)
    assert f"{file.name}, row 1, field '{column}'" in str(error.value)


def test_gqa_missing_image_and_skip_bad(gqa):
    file, images = gqa
    (images / "2368341.jpg").unlink()
    with pytest.raises(DataError, match="no image file for id '2368341'") as error:
        load_gqa(file, images)
    assert (error.value.row, error.value.field) == (2, "image")
    assert "looked for 2368341.jpg, 2368341.jpeg, 2368341.png, 2368341.webp" in str(error.value)
    data = load_gqa(file, images, skip_bad=True)
    assert data.ids == ["0123"]
    assert len(data.skipped) == 1 and "row 2, field 'image'" in data.skipped[0]
    assert "2368341.jpg" in data.skipped[0]


@pytest.mark.parametrize("extension", [".jpeg", ".png", ".webp", ".PNG"])
def test_gqa_finds_images_by_id_with_any_common_extension(gqa, extension):
    file, images = gqa
    (images / "2368341.jpg").rename(images / f"2368341{extension}")
    data = load_gqa(file, images)
    assert data[1].image == images / f"2368341{extension}"
    assert data[0].image == images / "2354786.jpg"


def test_gqa_refuses_two_images_of_one_id(gqa):
    file, images = gqa
    save_image(images / "2368341.png")
    with pytest.raises(DataError, match=r"row 2, field 'image': several images for id '2368341'"):
        load_gqa(file, images)


def test_gqa_missing_required_column(tmp_path):
    header = [name for name in GQA_HEADER if name != "img_id"]
    file = write_csv(tmp_path / "ChooseAttr.csv", header, [])
    with pytest.raises(DataError, match="required column missing") as error:
        load_gqa(file)
    assert (error.value.row, error.value.field) == (None, "img_id")


def test_gqa_row_longer_than_the_header(gqa):
    file, images = gqa
    write_csv(file, GQA_HEADER, [[*GQA_ROWS[0], "extra"]])
    with pytest.raises(DataError, match="not a readable CSV file") as error:
        load_gqa(file, images)
    assert error.value.file == str(file)


def test_gqa_duplicate_question_id(gqa):
    file, images = gqa
    write_csv(file, GQA_HEADER, [GQA_ROWS[0], GQA_ROWS[0]])
    with pytest.raises(DataError, match="occurs twice") as error:
        load_gqa(file, images)
    assert (error.value.row, error.value.field) == (2, "question_id")


# --- POPE ------------------------------------------------------------------------------------


@pytest.fixture
def pope(tmp_path: Path) -> tuple[Path, Path]:
    """(folder with the random and adversarial splits, image folder)."""
    images = tmp_path / "val2014"
    names = ["COCO_val2014_000000310196.jpg", "COCO_val2014_000000210789.jpg"]
    for name in names:
        save_image(images / name)
    questions = [(1, names[0], "Is there a dog in the image?"), (2, names[1], "Is there a cat?")]
    for split, labels in (("random", ("yes", "no")), ("adversarial", ("no", "yes"))):
        records = [
            {"question_id": question_id, "image": name, "text": text, "label": label}
            for (question_id, name, text), label in zip(questions, labels, strict=True)
        ]
        write_jsonl(tmp_path / "pope" / f"coco_pope_{split}.json", records)
    return tmp_path / "pope", images


def test_pope_splits_are_concatenated_with_unique_ids(pope):
    folder, images = pope
    data = load_pope(folder, images)
    assert (data.name, data.max_new_tokens) == ("pope", 8)
    assert data.ids == ["adversarial-1", "adversarial-2", "random-1", "random-2"]
    sample = data[2]
    assert (sample.question, sample.answer, sample.question_type) == (
        "Is there a dog in the image?",
        "yes",
        "random",
    )
    assert sample.suffix == POPE_SUFFIX
    assert sample.image == images / "COCO_val2014_000000310196.jpg"
    assert sample.metadata["question_id"] == 1
    assert load_pope(folder / "coco_pope_random.json", images).ids == ["random-1", "random-2"]


def test_pope_wrong_label(pope):
    folder, images = pope
    file = folder / "coco_pope_random.json"
    lines = file.read_text().splitlines()
    lines[1] = lines[1].replace('"label": "no"', '"label": "No!"')
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="neither 'yes' nor 'no'") as error:
        load_pope(file, images)
    assert (error.value.row, error.value.field) == (2, "label")
    assert "coco_pope_random.json, row 2, field 'label'" in str(error.value)
    assert load_pope(file, images, skip_bad=True).ids == ["random-1"]


# --- ScienceQA (Hugging Face Parquet) ------------------------------------------------------------


@pytest.fixture
def scienceqa(tmp_path: Path) -> Path:
    return write_scienceqa(tmp_path / "data" / "test-00000-of-00001.parquet")


def test_scienceqa_cqm_a_prompt(scienceqa):
    data = load_scienceqa(scienceqa)
    assert (data.name, data.max_new_tokens, data.ids) == ("scienceqa", 4, ["test-00000-of-00001-0"])
    sample = data[0]
    # LLaVA's converter: hint stripped, double spaces collapsed.
    assert sample.question == "Context: Pick one.\nWhich is a solid?\nA. milk\nB. rock"
    assert sample.suffix == "\nAnswer with the option's letter from the given choices directly."
    assert (sample.answer, sample.options) == ("B", ("milk", "rock"))
    assert sample.load_image().size == (112, 112)
    assert sample.metadata["subject"] == "natural science"


def test_scienceqa_text_only_rows(scienceqa):
    data = load_scienceqa(scienceqa.parent, image_only=False)
    assert data.ids == ["test-00000-of-00001-0", "test-00000-of-00001-1"]
    assert data[1].image is None
    assert data[1].question == "Which word is a noun?\nA. run\nB. cup\nC. blue"
    assert data.skipped == ()


def test_scienceqa_answer_out_of_range(tmp_path):
    file = tmp_path / "test.parquet"
    row = {"image": None, "question": "Q?", "choices": ["a", "b"], "answer": 2, "hint": ""}
    pq.write_table(scienceqa_table([row]), file)
    with pytest.raises(DataError, match="index 2 of 2 choices") as error:
        load_scienceqa(file, image_only=False)
    assert (error.value.row, error.value.field) == (1, "answer")
    with pytest.raises(ValueError, match="inside its Parquet files"):
        load_scienceqa(file, images=tmp_path)


# --- TextVQA -----------------------------------------------------------------------------------


def test_textvqa(tmp_path):
    file = write_textvqa(tmp_path / "TextVQA_0.5.1_val.json", tmp_path / "train_images")
    data = load_textvqa(file, tmp_path / "train_images")
    assert (data.name, data.max_new_tokens, data.ids) == ("textvqa", 16, ["34602", "34603"])
    first, second = data
    assert len(first.answers) == 10 and first.answers[:2] == ("nous les gosses", "dakota")
    assert first.answer == "dakota"
    assert second.answer == "b"  # a tie goes to the answer listed first
    assert first.suffix == POPE_SUFFIX
    assert first.image == tmp_path / "train_images" / "003a8ae2ef43b901.jpg"
    assert first.metadata["ocr_tokens"] == ["MIX", "dakota"]

    content = json.loads(file.read_text())
    content["data"][1]["answers"] = "b"
    file.write_text(json.dumps(content))
    with pytest.raises(DataError, match="list of strings") as error:
        load_textvqa(file, tmp_path / "train_images")
    assert (error.value.row, error.value.field) == ("data[1]", "answers")


# --- COCO captions for CHAIR -------------------------------------------------------------------


@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path]:
    """(annotation folder, image folder): images 1-6, all but 6 annotated."""
    images = [
        {"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": 6, "width": 8}
        for i in range(1, 7)
    ]
    for entry in images:
        save_image(tmp_path / "val2014" / entry["file_name"])
    categories = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
                  {"id": 67, "name": "dining table"}]  # fmt: skip
    pairs = [(1, 18), (1, 1), (1, 18), (2, 67), (3, 1), (4, 18), (5, 67), (5, 1)]
    annotations = [
        {"id": 100 + n, "image_id": image_id, "category_id": category, "bbox": [0, 0, 2, 2]}
        for n, (image_id, category) in enumerate(pairs)
    ]
    folder = tmp_path / "annotations"
    folder.mkdir()
    (folder / "instances_val2014.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    captions = [{"id": 1, "image_id": 1, "caption": "A man with two dogs."},
                {"id": 2, "image_id": 1, "caption": "Dogs and a person."}]  # fmt: skip
    (folder / "captions_val2014.json").write_text(json.dumps({"annotations": captions}))
    return folder, tmp_path / "val2014"


def test_chair_objects_and_captions(coco):
    folder, images = coco
    data = load_chair(folder, images, n_images=None)
    assert (data.name, data.max_new_tokens) == ("chair", 512)
    assert data.ids == ["1", "2", "3", "4", "5"]  # image 6 has no instance annotations
    first = data[0]
    assert first.question == "Please describe this image in detail." and first.suffix == ""
    assert first.metadata["objects"] == ["dog", "person"]
    assert first.metadata["captions"] == ["A man with two dogs.", "Dogs and a person."]
    assert first.image == images / "COCO_val2014_000000000001.jpg"
    assert data[4].metadata["objects"] == ["dining table", "person"]
    assert data[1].metadata["captions"] == []


def test_chair_subset_is_seeded(coco):
    folder, images = coco
    subsets = {seed: load_chair(folder, images, n_images=3, seed=seed).ids for seed in (0, 1)}
    assert len(subsets[0]) == 3 and subsets[0] == sorted(subsets[0], key=int)
    assert load_chair(folder, images, n_images=3, seed=0).ids == subsets[0]
    assert subsets[0] != subsets[1]


def test_chair_missing_image(coco):
    folder, images = coco
    (images / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(DataError, match="does not exist") as error:
        load_chair(folder, images, n_images=None)
    assert (error.value.row, error.value.field) == ("images[1]", "image")
    assert "instances_val2014.json" in str(error.value)
    assert load_chair(folder, images, n_images=None, skip_bad=True).ids == ["1", "3", "4", "5"]


@pytest.mark.parametrize(
    "key, duplicate, row",
    [
        ("images", {"id": 3, "file_name": "other.jpg", "height": 2, "width": 2}, "images[6]"),
        ("categories", {"id": 1, "name": "cat"}, "categories[3]"),
    ],
)
def test_chair_duplicate_image_or_category_ids_are_errors(coco, key, duplicate, row):
    folder, images = coco
    file = folder / "instances_val2014.json"
    content = json.loads(file.read_text())
    first = next(i for i, entry in enumerate(content[key]) if entry["id"] == duplicate["id"])
    content[key].append(duplicate)
    file.write_text(json.dumps(content))
    with pytest.raises(
        DataError, match=rf"{key} id {duplicate['id']} occurs twice \(also {key}\[{first}\]\)"
    ) as error:
        load_chair(folder, images, n_images=None)
    assert (error.value.row, error.value.field) == (row, "id")


# --- shapes and samples made in Python ------------------------------------------------------


def test_shapes():
    data = load("shapes:3", seed=1)
    expected = generate(3, seed=1)
    assert (data.name, data.max_new_tokens) == ("shapes", 4)
    assert data.ids == ["shapes-1-0", "shapes-1-1", "shapes-1-2"]
    assert [(s.question, s.answer, s.boxes, s.options) for s in data] == [
        (s.question, s.answer, s.boxes, s.options) for s in expected
    ]
    assert data[0].metadata == {"subtype": expected[0].subtype, "seed": 1, "index": 0}
    assert data[0].image.size == (112, 112)
    with pytest.raises(ValueError, match="images=None"):
        load_shapes(3, images="somewhere")
    with pytest.raises(ValueError, match="sample count"):
        load("shapes:many")


def test_from_samples():
    made = generate(2, seed=0)
    data = from_samples([*made, Sample("mine", "Why?")], name="shapes")
    assert data.ids == ["0", "1", "mine"] and data.name == "shapes"
    assert data[1].boxes == made[1].boxes and data[1].question_type == made[1].question_type
    with pytest.raises(TypeError, match="no 'question'"):
        from_samples([object()])


# --- your own CSV and JSON lines -------------------------------------------------------------


def test_custom_csv(tmp_path):
    save_image(tmp_path / "pictures" / "cat.png")
    rows = [
        ["q1", "Is the cat black or white?", "cat.png", "black", "black | dark", "black|white",
         "choose", "[[1, 2, 5, 6]]", " Answer briefly.", "mine"],
        ["q2", "What is 2 + 2?", "", "", "", "", "", "", "", ""],
    ]  # fmt: skip
    file = write_csv(tmp_path / "questions.csv", CUSTOM_HEADER, rows)
    data = load_csv(file, tmp_path / "pictures")
    assert (data.name, data.max_new_tokens, data.ids) == ("custom", 16, ["q1", "q2"])
    first, second = data
    assert first.image == tmp_path / "pictures" / "cat.png"
    assert (first.answer, first.answers, first.options) == (
        "black",
        ("black", "dark"),
        ("black", "white"),
    )
    assert (first.question_type, first.boxes, first.suffix) == (
        "choose",
        ((1, 2, 5, 6),),
        " Answer briefly.",
    )
    assert first.metadata == {"source": "mine"}
    assert (second.image, second.answer, second.answers, second.boxes) == (None, None, (), ())


def test_custom_csv_unknown_and_missing_columns(tmp_path):
    file = write_csv(tmp_path / "a.csv", ["sample_id", "question", "anwser"], [["1", "Q?", "x"]])
    with pytest.raises(DataError, match="unknown field; allowed") as error:
        load_csv(file)
    assert (error.value.row, error.value.field) == (None, "anwser")
    assert "'answer'" in str(error.value) and "'meta_'" in str(error.value)
    file = write_csv(tmp_path / "b.csv", ["sample_id", "answer"], [["1", "x"]])
    with pytest.raises(DataError, match="required column missing") as error:
        load_csv(file)
    assert error.value.field == "question"


def test_custom_jsonl(tmp_path):
    image = save_image(tmp_path / "elsewhere" / "dog.jpg")
    records = [
        {"sample_id": 7, "question": "Where is the dog?", "image": str(image),
         "boxes": [[0, 0, 4, 3]], "answers": ["left"], "metadata": {"source": "mine"}},
        {"sample_id": "b", "question": "Why?", "image": None},
    ]  # fmt: skip
    file = write_jsonl(tmp_path / "questions.jsonl", records)
    data = load_jsonl(file, tmp_path / "unused")
    assert data.ids == ["7", "b"]
    assert data[0].image == image  # an absolute path is used as it is
    assert (data[0].boxes, data[0].answers) == (((0, 0, 4, 3),), ("left",))
    assert data[0].metadata == {"source": "mine"} and data[1].image is None


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({"sample_id": "x", "question": "Q?", "anwser": "y"}, "anwser", "unknown field"),
        ({"sample_id": "x", "question": "Q?", "boxes": [[1, 2, 3]]}, "boxes", "a box is"),
        ({"sample_id": "x", "question": "Q?", "boxes": [[5, 2, 3, 4]]}, "boxes", "empty"),
        ({"sample_id": "x", "question": 3}, "question", "expected a string"),
        ({"sample_id": "x", "question": "Q?", "image": "gone.jpg"}, "image", "does not exist"),
    ],
)
def test_custom_jsonl_errors(tmp_path, record, field, problem):
    file = write_jsonl(tmp_path / "q.jsonl", [{"sample_id": "ok", "question": "Q?"}, record])
    with pytest.raises(DataError, match=problem) as error:
        load_jsonl(file)
    assert (error.value.file, error.value.row, error.value.field) == (str(file), 2, field)
    data = load_jsonl(file, skip_bad=True)
    assert data.ids == ["ok"] and f"q.jsonl, row 2, field '{field}'" in data.skipped[0]


# --- dispatch and sharding ------------------------------------------------------------------


def test_load_dispatch_and_unknown_format(gqa):
    file, images = gqa
    data = load(f"gqa:{file}", images)
    assert data.ids == load_gqa(file, images).ids and data.name == "gqa"
    assert list(FORMATS) == ["gqa", "pope", "scienceqa", "textvqa", "chair", "shapes", "csv",
                             "jsonl"]  # fmt: skip
    for spec in ("vqav2:data.json", str(file)):
        with pytest.raises(ValueError, match="formats: gqa, pope, scienceqa") as error:
            load(spec)
        assert not isinstance(error.value, DataError)


def test_shards_partition_the_ids(pope):
    for data in (load(f"pope:{pope[0]}", pope[1]), load("shapes:24")):
        shards = [data.shard(rank, 3) for rank in range(3)]
        ids = [sample_id for shard in shards for sample_id in shard.ids]
        assert sorted(ids) == sorted(data.ids) and len(set(ids)) == len(ids)
    assert sum(1 for shard in shards if len(shard)) > 1  # the 24 shapes spread over shards
