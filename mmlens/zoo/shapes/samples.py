"""Samples of the shapes VQA: `ShapesSample`, `generate` and `make_sample` (a pure function of
``(seed, index, question_type)``), `counterfactual` (a clean/corrupted pair whose answer
changes) and `conversation` (follow-up questions about a sample's image).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from PIL import Image

from mmlens.zoo.shapes.builders import _BUILDERS
from mmlens.zoo.shapes.questions import QUESTION_TYPES, TEMPLATES, Turn, _check_type, ask
from mmlens.zoo.shapes.scene import COLORS, N_OBJECTS, SHAPES, Box, ShapeObject, render_scene


@dataclass(frozen=True)
class ShapesSample:
    """One synthetic VQA sample.

    Attributes:
        image: 112 x 112 RGB image.
        question: the question (no conversation template; `model.prepare` adds it).
        answer: the single-word answer (lower case).
        question_type: one of `QUESTION_TYPES`.
        boxes: boxes of the objects the question names that are in the image, in the order the
            question names them (``(x0, y0, x1, y1)``, x1/y1 exclusive).
        referred: the `ShapeObject` s behind `boxes`, same order.
        objects: every object in the image.
        options: the two options of a "choose" question in question order (ChooseAttr,
            ChooseCat, ChooseRel), else ``()``.
        subtype: the template family: "color" / "size" (ChooseAttr, ChooseCat), "horizontal" /
            "vertical" (ChooseRel), "common" (CompareAttr), "or" / "and" (LogicalObj),
            "position" / "color" (QueryAttr), "object" (Exist).
        seed, index: what `make_sample` was called with.
    """

    image: Image.Image = field(repr=False)
    question: str
    answer: str
    question_type: str
    boxes: tuple[Box, ...]
    referred: tuple[ShapeObject, ...]
    objects: tuple[ShapeObject, ...]
    options: tuple[str, ...]
    subtype: str
    seed: int
    index: int


def generate(
    n: int,
    seed: int = 0,
    question_types: Sequence[str] = QUESTION_TYPES,
    *,
    start: int = 0,
    n_objects: Sequence[int] = N_OBJECTS,
) -> list[ShapesSample]:
    """`n` samples, the question types taken in turn.

    Sample ``i`` is ``make_sample(seed, start + i, question_types[(start + i) % len(question_types)])``.

    Args:
        n: number of samples.
        seed: dataset seed; different seeds give independent datasets.
        question_types: the types to cycle through (default: all of `QUESTION_TYPES`).
        start: index of the first sample (to continue a stream).
        n_objects: how many objects a scene may hold (uniform over these; types that compare two
            objects use at least 2). Fewer objects make easier scenes (the training curriculum).

    Examples:
        >>> [s.question_type for s in generate(3, seed=1, question_types=["Exist", "ChooseCat"])]
        ['Exist', 'ChooseCat', 'Exist']
    """
    types = list(question_types)
    for question_type in types:
        _check_type(question_type)
    return [
        make_sample(seed, index, types[index % len(types)], n_objects=n_objects)
        for index in range(start, start + n)
    ]


def make_sample(
    seed: int, index: int, question_type: str, *, n_objects: Sequence[int] = N_OBJECTS
) -> ShapesSample:
    """The sample number `index` of type `question_type` in the dataset `seed` (deterministic).

    Examples:
        >>> make_sample(0, 5, "Exist").answer in ("yes", "no")
        True
    """
    _check_type(question_type)
    if not n_objects or not all(1 <= n <= len(SHAPES) - 1 for n in n_objects):
        raise ValueError(f"n_objects must be counts between 1 and {len(SHAPES) - 1}: {n_objects}")
    rng = random.Random(f"mmlens.zoo.shapes/{seed}/{index}/{question_type}")
    for _ in range(1000):
        n = rng.choice(list(n_objects))
        built = _BUILDERS[question_type](rng, n)
        if built is not None:
            question, answer, objects, named, options, subtype = built
            referred = tuple(obj for shape in named for obj in objects if obj.shape == shape)
            return ShapesSample(
                image=render_scene(objects),
                question=question,
                answer=answer,
                question_type=question_type,
                boxes=tuple(obj.box for obj in referred),
                referred=referred,
                objects=tuple(objects),
                options=options,
                subtype=subtype,
                seed=seed,
                index=index,
            )
    raise RuntimeError(f"could not build a {question_type} sample (seed {seed}, index {index})")


def counterfactual(sample: ShapesSample) -> ShapesSample:
    """The same scene and question with one attribute changed so that the answer changes: a
    clean/corrupted pair for activation patching with a known answer change.

    For a ChooseAttr colour question ("Is the star blue or red?") the asked object takes the other
    option's colour; for a QueryAttr colour question ("What color is the star?") it takes the next
    colour of `COLORS`. Nothing else moves: same objects, places and sizes, same words, so every
    segment of the two prompts has the same length.

    Raises:
        ValueError: another question type or subtype (their answers do not follow from one
            object's colour alone).

    Examples:
        >>> clean = generate(1, seed=0)[0]
        >>> corrupted = counterfactual(clean)
        >>> clean.question == corrupted.question, clean.answer, corrupted.answer
        (True, 'red', 'blue')
        >>> [obj.color for obj in clean.objects], [obj.color for obj in corrupted.objects]
        (['red', 'green', 'purple', 'orange'], ['blue', 'green', 'purple', 'orange'])
    """
    if (sample.question_type, sample.subtype) == ("ChooseAttr", "color"):
        new_color = next(option for option in sample.options if option != sample.answer)
    elif (sample.question_type, sample.subtype) == ("QueryAttr", "color"):
        colors = list(COLORS)
        new_color = colors[(colors.index(sample.answer) + 1) % len(colors)]
    else:
        raise ValueError(
            f"counterfactual pairs exist for ChooseAttr and QueryAttr colour questions; this is "
            f"{sample.question_type} ({sample.subtype}). Pick samples with "
            "generate(..., question_types=['ChooseAttr', 'QueryAttr']) and keep the colour ones"
        )
    (target,) = sample.referred
    changed = replace(target, color=new_color)
    objects = tuple(changed if obj == target else obj for obj in sample.objects)
    return replace(
        sample,
        image=render_scene(objects),
        answer=new_color,
        referred=(changed,),
        objects=objects,
    )


def conversation(
    sample: ShapesSample,
    n_turns: int,
    question_types: Sequence[str] = QUESTION_TYPES,
    *,
    color_lures: float = 0.0,
    swapped_twins: float = 0.0,
) -> list[Turn]:
    """`n_turns` questions about `sample`'s image: its own question first, then follow-ups.

    Follow-up types are drawn at random from `question_types`; each is derived from the scene by
    `ask` (with `color_lures`; a type the scene cannot support, e.g. CompareAttr without a pair
    sharing exactly one attribute, is redrawn), and no question repeats. With `swapped_twins`, a
    LogicalObj follow-up is followed by its twin with the two colours exchanged ("either a red
    star or a blue circle" after "either a blue star or a red circle") where that changes the
    answer: the same words, the other answer, so only which colour goes with which shape decides.
    Deterministic given the sample. The training script asks each of them as its own single-turn
    question about the image (several supervised answers per image; the questions never see each
    other).

    Examples:
        >>> [turn.question_type for turn in conversation(generate(1)[0], 3)][0]
        'ChooseAttr'
    """
    turns = [
        Turn(
            sample.question,
            sample.answer,
            sample.question_type,
            sample.subtype,
            _named_in(sample.question),
        )
    ]
    rng = random.Random(f"mmlens.zoo.shapes/turns/{sample.seed}/{sample.index}")
    for _ in range(100 * n_turns):
        if len(turns) >= n_turns:
            break
        turn = ask(rng, sample.objects, rng.choice(list(question_types)), color_lures=color_lures)
        asked = {t.question for t in turns}
        if turn is None or turn.question in asked:
            continue
        turns.append(turn)
        if turn.question_type == "LogicalObj" and swapped_twins and rng.random() < swapped_twins:
            twin = _swapped_twin(turn, sample.objects)
            if len(turns) < n_turns and twin.answer != turn.answer and twin.question not in asked:
                turns.append(twin)
    return turns


def _swapped_twin(turn: Turn, objects: Sequence[ShapeObject]) -> Turn:
    """`turn` (LogicalObj) with its two colours exchanged, answered from the scene `objects`."""
    words = turn.question.rstrip("?").split()
    (color, shape), (color2, shape2) = (words[-6], words[-5]), (words[-2], words[-1])
    scene = {(obj.color, obj.shape) for obj in objects}
    found = [(color2, shape) in scene, (color, shape2) in scene]
    answer = any(found) if turn.subtype == "or" else all(found)
    template = TEMPLATES["LogicalObj"][0 if turn.subtype == "or" else 1]
    question = template.format(color=color2, shape=shape, color2=color, shape2=shape2)
    return Turn(question, "yes" if answer else "no", turn.question_type, turn.subtype, turn.named)


def _named_in(question: str) -> tuple[str, ...]:
    words = re.findall(r"\w+", question)
    return tuple(word for word in words if word in SHAPES)
