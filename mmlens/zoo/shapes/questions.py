"""Questions of the shapes VQA: the question types (`QUESTION_TYPES`), their templates and
answers (`TEMPLATES`, `ANSWERS`), the words they use (`vocabulary`), the conversation template
the organisms are asked with (`TEMPLATE`), and `ask`: a random question of a type about a given
scene, as a `Turn` (the follow-up questions of `mmlens.zoo.shapes.samples.conversation`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from mmlens.zoo.shapes.scene import COLORS, SHAPES, SIZES, ShapeObject

TEMPLATE = "llava_v1"
"""The conversation template the shapes organisms are trained and asked with (their word-level
tokenizer knows the words of its system prompt)."""

QUESTION_TYPES = (
    "ChooseAttr",
    "ChooseCat",
    "ChooseRel",
    "CompareAttr",
    "LogicalObj",
    "QueryAttr",
    "Exist",
)
"""The six GQA types of the Cross-modal paper, then POPE-style existence ("Exist")."""

MIN_SEPARATION = 20
"""ChooseRel: the two centres differ by at least this many pixels along the asked axis."""

MIDDLE_BAND = (44, 68)
"""QueryAttr position: an object whose centre x lies in ``[44, 68)`` is never asked about."""

TEMPLATES: dict[str, tuple[str, ...]] = {
    "ChooseAttr": (
        "Is the {shape} {option1} or {option2}?",
    ),
    "ChooseCat": (
        "Which shape is {attribute}, the {option1} or the {option2}?",
    ),
    "ChooseRel": (
        "Is the {shape} to the {option1} or to the {option2} of the {shape2}?",
        "Is the {shape} {option1} or {option2} the {shape2}?",
    ),
    "CompareAttr": (
        "What is common to the {shape} and the {shape2}?",
    ),
    "LogicalObj": (
        "Is there either a {color} {shape} or a {color2} {shape2}?",
        "Is there both a {color} {shape} and a {color2} {shape2}?",
    ),
    "QueryAttr": (
        "In which part of the image is the {shape}?",
        "What color is the {shape}?",
    ),
    "Exist": (
        "Is there a {shape} in the image?",
    ),
}  # fmt: skip
"""Every question template, per type (fields: shapes, colours, options)."""

ANSWERS: dict[str, tuple[str, ...]] = {
    "ChooseAttr": (*COLORS, *SIZES),
    "ChooseCat": SHAPES,
    "ChooseRel": ("left", "right", "above", "below"),
    "CompareAttr": ("color", "size"),
    "LogicalObj": ("yes", "no"),
    "QueryAttr": ("left", "right", *COLORS),
    "Exist": ("yes", "no"),
}
"""Every answer a type can have."""


def vocabulary() -> list[str]:
    """Every word the templates, the answers and the LLaVA-1.5 conversation can produce, sorted.

    Words as the tiny-shapes tokenizer splits them (``\\w+`` runs and punctuation runs).
    """
    from mmlens.inputs.templates import LLAVA_V1_SYSTEM_PROMPT

    texts = [LLAVA_V1_SYSTEM_PROMPT, "USER: ASSISTANT:", *COLORS, *SHAPES, *SIZES]
    for templates in TEMPLATES.values():
        for template in templates:
            for name in ("shape", "shape2", "color", "color2", "attribute", "option1", "option2"):
                template = template.replace("{" + name + "}", " ")
            texts.append(template)
    texts += [answer for answers in ANSWERS.values() for answer in answers]
    return sorted({word for text in texts for word in re.findall(r"\w+|[^\w\s]+", text)})


@dataclass(frozen=True)
class Turn:
    """One question about a scene (a turn of a multi-turn conversation).

    Attributes:
        question, answer, question_type, subtype: as in `ShapesSample`.
        named: the shapes the question names, in order (present or not).
    """

    question: str
    answer: str
    question_type: str
    subtype: str
    named: tuple[str, ...]


def ask(
    rng: random.Random,
    objects: Sequence[ShapeObject],
    question_type: str,
    *,
    color_lures: float = 0.0,
) -> Turn | None:
    """A random question of `question_type` about the scene `objects`, or None if the scene has
    none (answers balanced where the scene allows: yes/no drawn first, options shuffled).

    `color_lures`: in LogicalObj, the chance that a wrong colour named for a shape in the image is
    one that another object of the scene has ("a green star" where the star is red and the circle
    green), where there is one. Such binding lures catch a model that checks the colour and the
    shape separately; at 0 (the evaluation sets' rule) the wrong colour is any other colour.
    """
    _check_type(question_type)
    objects = list(objects)
    present = {obj.shape for obj in objects}
    absent = [shape for shape in SHAPES if shape not in present]
    target = rng.choice(objects)
    if question_type == "ChooseAttr":
        if rng.random() < 2 / 3:
            other = rng.choice([c for c in COLORS if c != target.color])
            answer, subtype = target.color, "color"
        else:
            other = next(size for size in SIZES if size != target.size)
            answer, subtype = target.size, "size"
        options = _shuffled(rng, [answer, other])
        question = TEMPLATES["ChooseAttr"][0].format(
            shape=target.shape, option1=options[0], option2=options[1]
        )
        return Turn(question, answer, question_type, subtype, (target.shape,))
    if question_type == "ChooseCat":
        subtype = "color" if rng.random() < 2 / 3 else "size"
        value = getattr(target, subtype)
        distractors = absent + [o.shape for o in objects if getattr(o, subtype) != value]
        if not distractors:
            return None
        options = _shuffled(rng, [target.shape, rng.choice(distractors)])
        question = TEMPLATES["ChooseCat"][0].format(
            attribute=value, option1=options[0], option2=options[1]
        )
        return Turn(question, target.shape, question_type, subtype, options)
    if question_type == "ChooseRel":
        subtype = "horizontal" if rng.random() < 0.5 else "vertical"
        axis = 0 if subtype == "horizontal" else 1
        pairs = [
            (a, b)
            for a in objects
            for b in objects
            if a is not b and abs(a.center[axis] - b.center[axis]) >= MIN_SEPARATION
        ]
        if not pairs:
            return None
        first, second = rng.choice(pairs)
        before = first.center[axis] < second.center[axis]
        if subtype == "horizontal":
            answer, options = ("left" if before else "right"), _shuffled(rng, ["left", "right"])
        else:
            answer, options = ("above" if before else "below"), _shuffled(rng, ["above", "below"])
        question = TEMPLATES["ChooseRel"][axis].format(
            shape=first.shape, shape2=second.shape, option1=options[0], option2=options[1]
        )
        return Turn(question, answer, question_type, subtype, (first.shape, second.shape))
    if question_type == "CompareAttr":
        pairs = [
            (a, b)
            for a in objects
            for b in objects
            if a is not b and (a.color == b.color) != (a.size == b.size)
        ]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        answer = "color" if a.color == b.color else "size"
        question = TEMPLATES["CompareAttr"][0].format(shape=a.shape, shape2=b.shape)
        return Turn(question, answer, question_type, "common", (a.shape, b.shape))
    if question_type == "LogicalObj":
        if len(objects) < 2:
            return None
        subtype, answer = rng.choice(["or", "and"]), rng.choice(["yes", "no"])
        if subtype == "or":
            choices = (
                [(False, False)] if answer == "no" else [(True, False), (False, True), (True, True)]
            )
        else:
            choices = (
                [(True, True)]
                if answer == "yes"
                else [(True, False), (False, True), (False, False)]
            )
        match = rng.choice(choices)
        picked = rng.sample(objects, 2)
        absent_left = list(absent)
        descriptions = []
        for obj, is_match in zip(picked, match, strict=True):
            if is_match:
                descriptions.append((obj.color, obj.shape))
            elif not absent_left or rng.random() < 0.5:
                lures = sorted({other.color for other in objects} - {obj.color})
                wrong = [c for c in COLORS if c != obj.color]
                if color_lures and lures and rng.random() < color_lures:
                    wrong = lures
                descriptions.append((rng.choice(wrong), obj.shape))
            else:
                shape = absent_left.pop(rng.randrange(len(absent_left)))
                descriptions.append((rng.choice(list(COLORS)), shape))
        (color, shape), (color2, shape2) = descriptions
        template = TEMPLATES["LogicalObj"][0 if subtype == "or" else 1]
        question = template.format(color=color, shape=shape, color2=color2, shape2=shape2)
        return Turn(question, answer, question_type, subtype, (shape, shape2))
    if question_type == "QueryAttr":
        return _query(rng, target)
    # Exist
    if rng.random() < 0.5 or not absent:
        shape, answer = target.shape, "yes"
    else:
        shape, answer = rng.choice(absent), "no"
    question = TEMPLATES["Exist"][0].format(shape=shape)
    return Turn(question, answer, question_type, "object", (shape,))


def _query(rng: random.Random, target: ShapeObject) -> Turn | None:
    """A QueryAttr question about `target`: its side of the image or its colour (None where its
    centre lies in the middle band)."""
    if rng.random() < 0.5:
        x = target.center[0]
        if MIDDLE_BAND[0] <= x < MIDDLE_BAND[1]:
            return None
        answer = "left" if x < MIDDLE_BAND[0] else "right"
        question = TEMPLATES["QueryAttr"][0].format(shape=target.shape)
        return Turn(question, answer, "QueryAttr", "position", (target.shape,))
    question = TEMPLATES["QueryAttr"][1].format(shape=target.shape)
    return Turn(question, target.color, "QueryAttr", "color", (target.shape,))


def _shuffled(rng: random.Random, options: Sequence[str]) -> tuple[str, ...]:
    options = list(options)
    rng.shuffle(options)
    return tuple(options)


def _check_type(question_type: str) -> None:
    if question_type not in QUESTION_TYPES:
        raise ValueError(
            f"unknown question type {question_type!r}; known: {', '.join(QUESTION_TYPES)}"
        )
