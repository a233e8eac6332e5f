"""Benchmark metrics against hand-computed numbers (no model, no data files)."""

from __future__ import annotations

import doctest
from types import SimpleNamespace

import pandas as pd
import pytest

import mmlens.metrics
from mmlens.metrics import (
    COCO_CATEGORIES,
    DATASETS,
    SYNONYMS,
    answers,
    chair,
    chair_scores,
    exact_match,
    mentioned_objects,
    normalize_answer,
    parse_option_letter,
    parse_yes_no,
    pope,
    pope_metrics,
    score_sample,
    summarize,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        # "-" touches no space: it becomes one; then "the" is dropped.
        ("the Red-car", "red car"),
        ("dont", "don't"),
        ("He isnt here", "he isn't here"),
        ("3.5", "3.5"),
        # A period with no digit after it goes, even after a digit.
        ("3.", "3"),
        # A comma between digits anywhere: every mark is deleted, none becomes a space.
        ("1,000 red-cars", "1000 redcars"),
        # "," touches a space: deleted; "!" touches none: becomes a space (then stripped).
        ("Hello, world!", "hello world"),
        ("  An apple\tand ten\npears ", "apple and 10 pears"),
        ("none", "0"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_contractions_table_follows_the_official_list() -> None:
    # At least the common part of the official table, all keys lower-case (words are lowered).
    assert len(answers._CONTRACTIONS) >= 60
    assert all(key == key.lower() for key in answers._CONTRACTIONS)
    assert normalize_answer("whats wrong youre late") == "what's wrong you're late"


def test_exact_match() -> None:
    assert exact_match("The two cats.", "2 cats")
    assert exact_match("Yes", "yes")
    assert not exact_match("red car", "car")


# Ten annotators; leaving annotator i out, the other nine give min(matches / 3, 1).
TEN_ANSWERS = ["cat"] * 4 + ["dog"] * 3 + ["cow"] * 2 + ["owl"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        # 4 matches: any 9 keep >= 3 of them -> 1 each -> 1.0.
        ("cat", 1.0),
        # 3 matches: leaving out one of the 3 -> 2/3 (3 times), another -> 1 (7 times):
        # (3 * 2/3 + 7) / 10 = 0.9.
        ("A dog.", 0.9),
        # 2 matches: leaving out one of the 2 -> 1/3 (2 times), another -> 2/3 (8 times):
        # (2/3 + 16/3) / 10 = 0.6.
        ("cows", 0.0),
        ("Cow", 0.6),
        # 1 match: leaving it out -> 0 (once), another -> 1/3 (9 times): 3 / 10 = 0.3.
        ("owl", 0.3),
        ("horse", 0.0),
    ],
)
def test_vqa_accuracy(prediction: str, expected: float) -> None:
    assert vqa_accuracy(prediction, TEN_ANSWERS) == pytest.approx(expected)


def test_vqa_accuracy_needs_answers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("cat", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("No, there is not.", "no"),
        ("Yes.", "yes"),
        ("There is a dog", "yes"),
        ("not sure", "no"),
        ("Yes, there is no doubt.", "no"),
        # Only the first sentence counts.
        ("Yes. There is no cat.", "yes"),
        # LLaVA's rule is case-sensitive: "NO" is not a negation.
        ("NO", "yes"),
        (" no\n", "no"),
    ],
)
def test_parse_yes_no(text: str, expected: str) -> None:
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "n_options", "expected"),
    [
        ("B", 3, "B"),
        ("C. a cat", 3, "C"),
        ("The answer is A.", 3, "A"),
        ("I think so. The answer is B, clearly", 3, "B"),
        ("E", 3, "FAILED"),
        ("C", 2, "FAILED"),
        ("banana", 3, "FAILED"),
        # LLaVA needs a space after "C."; two "The answer is" are ambiguous.
        ("C.", 3, "FAILED"),
        ("The answer is A. The answer is B.", 3, "FAILED"),
    ],
)
def test_parse_option_letter(text: str, n_options: int, expected: str) -> None:
    assert parse_option_letter(text, n_options) == expected


def test_parse_option_letter_rejects_too_many_options() -> None:
    with pytest.raises(ValueError, match="0..26"):
        parse_option_letter("A", 27)


def test_pope_metrics_on_a_confusion_matrix() -> None:
    # 4 TP, 1 FP, 2 FN, 3 TN.
    predictions = ["yes"] * 4 + ["yes"] + ["no"] * 2 + ["no"] * 3
    labels = ["yes"] * 4 + ["no"] + ["yes"] * 2 + ["no"] * 3
    metrics = pope_metrics(predictions, labels)
    assert metrics["accuracy"] == pytest.approx(0.7)  # (4 + 3) / 10
    assert metrics["precision"] == pytest.approx(0.8)  # 4 / (4 + 1)
    assert metrics["recall"] == pytest.approx(4 / 6)  # 4 / (4 + 2)
    # 2 * 0.8 * 2/3 / (0.8 + 2/3) = (16/15) / (22/15) = 8/11.
    assert metrics["f1"] == pytest.approx(8 / 11)
    assert metrics["yes_ratio"] == pytest.approx(0.5)  # 5 "yes" of 10


def test_pope_metrics_zero_division_and_bad_input() -> None:
    assert pope_metrics(["no", "no"], ["no", "no"]) == {
        "accuracy": 1.0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "yes_ratio": 0.0,
    }
    assert pope_metrics([], [])["accuracy"] == 0.0
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        pope_metrics(["Yes"], ["yes"])
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        pope_metrics(["yes", "no"], ["yes"])


def test_coco_tables() -> None:
    assert len(COCO_CATEGORIES) == len(set(COCO_CATEGORIES)) == 80
    assert set(SYNONYMS) == set(COCO_CATEGORIES)
    assert {"man", "woman", "boy", "girl", "child", "kid", "people", "player"} <= set(
        SYNONYMS["person"]
    )


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A man riding a horse next to a car.", ["person", "horse", "car"]),
        # Two-word phrases win over their words.
        ("A hot dog on a plate.", ["hot dog"]),
        ("A Teddy-Bear and a bear.", ["teddy bear", "bear"]),
        ("A fire hydrant and a cell phone.", ["fire hydrant", "cell phone"]),
        # Synonyms and plurals.
        ("A bicycle and two bikes.", ["bicycle"]),
        ("Two dogs and three puppies.", ["dog"]),
        ("Women and children with knives and mice.", ["person", "knife", "mouse"]),
        ("Two buses and sandwiches.", ["bus", "sandwich"]),
        # Overrides: the animal's age is no person, tracks are no train.
        ("A baby elephant near the train tracks.", ["elephant"]),
        ("A passenger train and a toilet seat.", ["train", "toilet"]),
        ("Nothing to see here.", []),
    ],
)
def test_mentioned_objects(caption: str, expected: list[str]) -> None:
    assert mentioned_objects(caption) == expected


def test_chair_scores_on_three_captions() -> None:
    captions = [
        "A man riding a horse next to a car.",  # car is not there: 1 of 3
        "Two dogs play with a frisbee.",  # all there: 0 of 2
        "A cat on a couch with a remote and a laptop.",  # remote, laptop missing: 2 of 4
    ]
    ground_truth = [["person", "horse"], ["dog", "frisbee"], ["cat", "couch", "tv"]]
    scores = chair_scores(captions, ground_truth)
    assert scores["hallucinated"] == [["car"], [], ["remote", "laptop"]]
    assert scores["mentioned"][2] == ["cat", "couch", "remote", "laptop"]
    assert scores["CHAIR_s"] == pytest.approx(2 / 3)  # 2 captions of 3 hallucinate
    assert scores["CHAIR_i"] == pytest.approx(3 / 9)  # (1 + 0 + 2) / (3 + 2 + 4)
    assert chair_scores(captions[:1], ground_truth[:1])["CHAIR_i"] == pytest.approx(1 / 3)


def test_chair_scores_bad_input() -> None:
    with pytest.raises(ValueError, match=r"not COCO categories: \['people'\]"):
        chair_scores(["a man"], [["people"]])
    with pytest.raises(ValueError, match="2 captions but 1 ground truths"):
        chair_scores(["a man", "a dog"], [["person"]])
    assert chair_scores([], []) == {
        "CHAIR_s": 0.0,
        "CHAIR_i": 0.0,
        "mentioned": [],
        "hallucinated": [],
    }


def _sample(**fields) -> SimpleNamespace:
    """A stand-in for `mmlens.data.sample.Sample` with the attributes the metrics read."""
    defaults = {"answer": None, "answers": (), "options": (), "metadata": {}}
    return SimpleNamespace(**{**defaults, **fields})


def _run(
    dataset: str, samples_and_predictions: list[tuple[SimpleNamespace, str]]
) -> tuple[list[dict], dict[str, float]]:
    """`score_sample` of each pair, and `summarize` of those rows as a data frame."""
    rows = [score_sample(dataset, sample, text) for sample, text in samples_and_predictions]
    return rows, summarize(dataset, pd.DataFrame(rows))


@pytest.mark.parametrize("dataset", ["gqa", "shapes", "custom"])
def test_exact_match_datasets_end_to_end(dataset: str) -> None:
    rows, summary = _run(
        dataset,
        [
            (_sample(answer="red"), "Red."),
            (_sample(answer="2"), "two"),
            (_sample(answer="no"), "Y"),
        ],
    )
    assert rows[1] == {"prediction": "2", "correct": 1}
    assert [row["correct"] for row in rows] == [1, 1, 0]
    assert summary == {"accuracy": pytest.approx(2 / 3), "n": 3}


def test_pope_end_to_end() -> None:
    rows, summary = _run(
        "pope",
        [
            (_sample(answer="yes"), "Yes, there is a dog."),  # TP
            (_sample(answer="no"), "Yes."),  # FP
            (_sample(answer="yes"), "No, there is not."),  # FN
            (_sample(answer="no"), "There is no dog."),  # TN
        ],
    )
    assert rows[1] == {"prediction": "yes", "label": "no", "correct": 0}
    assert summary == {
        "accuracy": 0.5,
        "precision": 0.5,
        "recall": 0.5,
        "f1": 0.5,
        "yes_ratio": 0.5,
        "n": 4,
    }


def test_scienceqa_end_to_end() -> None:
    options = ("a cat", "a dog", "a cow")
    rows, summary = _run(
        "scienceqa",
        [
            (_sample(answer="B", options=options), "B"),
            (_sample(answer="A", options=options), "The answer is A."),
            (_sample(answer="C", options=options), "D"),
            (_sample(answer="C", options=options), "C. a cow"),
        ],
    )
    assert [row["prediction"] for row in rows] == ["B", "A", "FAILED", "C"]
    assert summary == {"accuracy": 0.75, "n": 4}


def test_textvqa_end_to_end() -> None:
    rows, summary = _run(
        "textvqa",
        [
            (_sample(answers=tuple(TEN_ANSWERS)), "Cat."),
            (_sample(answers=tuple(TEN_ANSWERS)), "cow"),
        ],
    )
    assert rows[0] == {"prediction": "cat", "accuracy": 1.0}
    assert summary["accuracy"] == pytest.approx((1.0 + 0.6) / 2)
    assert summary["n"] == 2


def test_chair_end_to_end() -> None:
    rows, summary = _run(
        "chair",
        [
            (_sample(metadata={"objects": ("person", "horse")}), "A man riding a horse by a car."),
            (_sample(metadata={"objects": ["dog"]}), "A dog."),
        ],
    )
    assert rows[0] == {
        "mentioned": "person,horse,car",
        "hallucinated": "car",
        "n_mentioned": 3,
        "n_hallucinated": 1,
    }
    assert rows[1]["hallucinated"] == ""
    assert summary == {"CHAIR_s": 0.5, "CHAIR_i": pytest.approx(1 / 4), "n": 2}


def test_summaries_of_no_rows_are_zero() -> None:
    empty = pd.DataFrame({"correct": pd.Series([], dtype=int)})
    assert summarize("gqa", empty) == {"accuracy": 0.0, "n": 0}


def test_missing_reference_answer() -> None:
    with pytest.raises(ValueError, match="gqa sample needs a reference answer"):
        score_sample("gqa", _sample(), "red")


def test_unknown_dataset() -> None:
    known = "gqa, shapes, custom, pope, scienceqa, textvqa, chair"
    assert ", ".join(DATASETS) == known
    with pytest.raises(ValueError, match=f"unknown data set 'vqav2'; known: {known}"):
        score_sample("vqav2", _sample(answer="x"), "x")
    with pytest.raises(ValueError, match="unknown data set 'vqav2'"):
        summarize("vqav2", pd.DataFrame({"correct": [1]}))


@pytest.mark.parametrize("module", [mmlens.metrics, answers, chair, pope])
def test_docstring_examples(module) -> None:
    failures, attempted = doctest.testmod(module, verbose=False)
    assert attempted > 0
    assert failures == 0
