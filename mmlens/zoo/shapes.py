"""Synthetic VQA on coloured shapes, with the ground-truth box of every object a question names.

`generate(n, seed)` draws `n` `ShapesSample` s: a 112 x 112 RGB image of 2-4 non-overlapping
shapes on a plain light-grey background, a question modelled on one of the six GQA question types
of *Cross-modal Information Flow in Multimodal Large Language Models* (Zhang et al., 2025) or a
POPE-style existence question, its single-word answer, and the bounding boxes of the objects the
question names. Everything is a pure function of ``(seed, index, question_type)``: the same call
gives the same pixels, questions and boxes in every process and on every platform (Python's
`random.Random` seeded with a string, PIL drawing without anti-aliasing).

Scenes: every object has a `shape` (circle, square, triangle, star, cross; at most one of each
per image, so "the circle" is never ambiguous), a `color` (red, green, blue, yellow, purple,
orange; colours may repeat) and a `size` (small: 24 px across, large: 38 px). Objects sit on the
14-px patch grid of the tiny-shapes vision tower: a small object owns a cell of 2 x 2 patches, a
large one 3 x 3, no two objects share a patch, and the shape is drawn inside its cell with a 2 px
margin. So every object is exactly a set of image tokens (its ground truth is never split across
a patch it shares with something else), and a patch shows one of a few fixed fragments of a shape;
with free placement, a from-scratch ViT of this size did not learn to tell the shapes apart within
the CPU training budget (docs/zoo.md).

Question types (`QUESTION_TYPES`; the paper's GQA examples in brackets):

============ ====================================================== ==========================
type         templates                                              answers
============ ====================================================== ==========================
ChooseAttr   Is the {shape} {color} or {color}?                     a colour / small, large
             Is the {shape} small or large?                         ["...the door, wood or metal?"]
ChooseCat    Which shape is {color|size}, the {shape} or the        a shape
             {shape}?                                               ["Which piece of furniture..."]
ChooseRel    Is the {shape} to the left or to the right of the      left, right, above, below
             {shape}? / Is the {shape} above or below the {shape}?
CompareAttr  What is common to the {shape} and the {shape}?         color, size
LogicalObj   Is there either a {color} {shape} or a {color}         yes, no
             {shape}? / Is there both a ... and a ...?
QueryAttr    In which part of the image is the {shape}?             left, right / a colour
             What color is the {shape}?
Exist        Is there a {shape} in the image?  (POPE)               yes, no
============ ====================================================== ==========================

Options of "choose" questions come in random order; answers are balanced within each type (each
option equally often the answer, yes as often as no). Spatial answers are only asked where they
are clear: centres at least `MIN_SEPARATION` pixels apart along the asked axis (ChooseRel), the
centre outside the middle band ``[44, 68)`` (QueryAttr "left"/"right").

Boxes follow the convention of `mmlens.inputs.MultimodalInput.patches_in_box`: ``(x0, y0, x1, y1)``
in image pixels with x1 and y1 exclusive (a PIL crop box), the tight box of the object's painted
pixels. `ShapesSample.boxes` holds the boxes of the objects the question names *that are in the
image*, in the order the question names them (a LogicalObj or Exist question may name a shape
that is absent: it then has fewer boxes, possibly none).

Examples:
    >>> from mmlens.zoo.shapes import generate
    >>> sample = generate(7, seed=0)[0]
    >>> sample.question_type, sample.question, sample.answer
    ('ChooseAttr', 'Is the star blue or red?', 'red')
    >>> sample.image.size, sample.boxes
    ((112, 112), ((2, 71, 39, 106),))
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]

TEMPLATE = "llava_v1"
"""The conversation template the shapes organisms are trained and asked with (their word-level
tokenizer knows the words of its system prompt)."""

IMAGE_SIZE = 112
"""Side of every image in pixels (8 x 8 patches of 14 px for the tiny-shapes model)."""

BACKGROUND = (225, 225, 225)
"""The plain background colour (light grey)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 130, 0),
}
"""Colour names and their RGB fill."""

SHAPES = ("circle", "square", "triangle", "star", "cross")
"""Shape names; an image holds each shape at most once."""

PATCH = 14
"""Side of a grid cell in pixels: the patch size of the tiny-shapes vision tower."""

SIZES: dict[str, int] = {"small": 2, "large": 3}
"""Size names and the side of the object's cell, in patches."""

MARGIN = 2
"""Pixels between an object's cell and its footprint (the square the shape is drawn in)."""

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

N_OBJECTS = (2, 3, 4)
"""How many objects a scene holds (uniform)."""

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


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene.

    Attributes:
        shape: one of `SHAPES`.
        color: one of `COLORS`.
        size: "small" or "large".
        box: tight box of its painted pixels, ``(x0, y0, x1, y1)``, x1/y1 exclusive.
        footprint: the square the shape is drawn in (same convention). `box` lies inside it,
            give or take one pixel (a star's tips can round one pixel past it). It is the
            object's cell of patches less `MARGIN` on every side; cells of one scene share no
            patch, so objects are at least ``2 * MARGIN`` pixels apart.
    """

    shape: str
    color: str
    size: str
    box: Box
    footprint: Box

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) centre of the box."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def description(self) -> str:
        """E.g. "small red circle"."""
        return f"{self.size} {self.color} {self.shape}"


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


# --- drawing -------------------------------------------------------------------------------------


def render_scene(objects: Sequence[ShapeObject]) -> Image.Image:
    """Paint `objects` (whose boxes are already tight) on the background."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj.shape, obj.footprint, COLORS[obj.color])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, footprint: Box, fill) -> None:
    """Draw `shape` filling the square `footprint` (x1/y1 exclusive)."""
    x0, y0, x1, y1 = footprint
    side = x1 - x0
    right, bottom = x1 - 1, y1 - 1  # PIL's drawing boxes are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, right, bottom), fill=fill)
    elif shape == "square":
        inset = round(side * 0.08)
        draw.rectangle((x0 + inset, y0 + inset, right - inset, bottom - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, bottom), (right, bottom), ((x0 + right) / 2, y0)], fill=fill)
    elif shape == "star":
        cx, cy, outer = (x0 + right) / 2, (y0 + bottom) / 2, side / 2
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else outer * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        arm = max(side // 3, 1)
        start = x0 + (side - arm) // 2
        draw.rectangle((start, y0, start + arm - 1, bottom), fill=fill)
        start = y0 + (side - arm) // 2
        draw.rectangle((x0, start, right, start + arm - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _tight_box(shape: str, footprint: Box) -> Box:
    """The box of the pixels `_draw_shape` paints for `shape` in `footprint`."""
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, footprint, 255)
    box = mask.getbbox()
    assert box is not None, (shape, footprint)
    return box


# --- scenes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    shape: str
    color: str
    size: str


def _place(rng: random.Random, specs: Sequence[_Spec]) -> list[ShapeObject] | None:
    """Place `specs` at random on the patch grid, no two sharing a patch; None on failure."""
    n_cells = IMAGE_SIZE // PATCH
    taken: set[tuple[int, int]] = set()
    footprints: list[Box] = []
    for spec in specs:
        side = SIZES[spec.size]
        for _ in range(100):
            column, row = rng.randint(0, n_cells - side), rng.randint(0, n_cells - side)
            cells = {(column + i, row + j) for i in range(side) for j in range(side)}
            if not cells & taken:
                taken |= cells
                x0, y0 = column * PATCH, row * PATCH
                footprints.append(
                    (
                        x0 + MARGIN,
                        y0 + MARGIN,
                        x0 + side * PATCH - MARGIN,
                        y0 + side * PATCH - MARGIN,
                    )
                )
                break
        else:
            return None
    return [
        ShapeObject(spec.shape, spec.color, spec.size, _tight_box(spec.shape, box), box)
        for spec, box in zip(specs, footprints, strict=True)
    ]


def _random_specs(rng: random.Random, n: int) -> list[_Spec]:
    return [
        _Spec(shape, rng.choice(list(COLORS)), rng.choice(list(SIZES)))
        for shape in rng.sample(SHAPES, n)
    ]


def _shuffled(rng: random.Random, options: Sequence[str]) -> tuple[str, ...]:
    options = list(options)
    rng.shuffle(options)
    return tuple(options)


# --- question builders: rng -> (question, answer, objects, named shapes, options, subtype) ------


def _choose_attr(rng: random.Random, n: int):
    specs = _random_specs(rng, n)
    target = specs[0]
    if rng.random() < 2 / 3:
        answer = rng.choice(list(COLORS))
        specs[0] = _Spec(target.shape, answer, target.size)
        other = rng.choice([color for color in COLORS if color != answer])
        subtype = "color"
    else:
        answer = rng.choice(list(SIZES))
        specs[0] = _Spec(target.shape, target.color, answer)
        other = next(size for size in SIZES if size != answer)
        subtype = "size"
    options = _shuffled(rng, [answer, other])
    objects = _place(rng, _shuffled_specs(rng, specs))
    if objects is None:
        return None
    question = TEMPLATES["ChooseAttr"][0].format(
        shape=target.shape, option1=options[0], option2=options[1]
    )
    return question, answer, objects, [target.shape], options, subtype


def _choose_cat(rng: random.Random, n: int):
    subtype = "color" if rng.random() < 2 / 3 else "size"
    values = list(COLORS) if subtype == "color" else list(SIZES)
    attribute = rng.choice(values)
    shapes = list(rng.sample(SHAPES, n + 1))  # the last one is absent from the image
    answer, distractor = shapes[0], shapes[1] if rng.random() < 0.5 else shapes[-1]
    specs = []
    for shape in shapes[:n]:
        spec = _Spec(shape, rng.choice(list(COLORS)), rng.choice(list(SIZES)))
        if shape == answer:
            spec = _with(spec, subtype, attribute)
        elif shape == distractor:
            spec = _with(spec, subtype, rng.choice([v for v in values if v != attribute]))
        specs.append(spec)
    objects = _place(rng, _shuffled_specs(rng, specs))
    if objects is None:
        return None
    options = _shuffled(rng, [answer, distractor])
    question = TEMPLATES["ChooseCat"][0].format(
        attribute=attribute, option1=options[0], option2=options[1]
    )
    return question, answer, objects, list(options), options, subtype


def _choose_rel(rng: random.Random, n: int):
    specs = _random_specs(rng, max(n, 2))
    objects = _place(rng, specs)
    if objects is None:
        return None
    first, second = objects[0], objects[1]
    subtype = "horizontal" if rng.random() < 0.5 else "vertical"
    axis = 0 if subtype == "horizontal" else 1
    delta = first.center[axis] - second.center[axis]
    if abs(delta) < MIN_SEPARATION:
        return None
    if subtype == "horizontal":
        answer = "left" if delta < 0 else "right"
        options = _shuffled(rng, ["left", "right"])
        template = TEMPLATES["ChooseRel"][0]
    else:
        answer = "above" if delta < 0 else "below"
        options = _shuffled(rng, ["above", "below"])
        template = TEMPLATES["ChooseRel"][1]
    # Balance: keep "left"/"above" and "right"/"below" equally likely whatever the scene.
    if answer != rng.choice(options):
        first, second = second, first
        answer = next(option for option in options if option != answer)
    question = template.format(
        shape=first.shape, shape2=second.shape, option1=options[0], option2=options[1]
    )
    return question, answer, objects, [first.shape, second.shape], options, subtype


def _compare_attr(rng: random.Random, n: int):
    specs = _random_specs(rng, max(n, 2))
    answer = rng.choice(["color", "size"])
    a, b = specs[0], specs[1]
    if answer == "color":
        size = rng.choice(list(SIZES))
        other_size = next(s for s in SIZES if s != size)
        specs[1] = _Spec(b.shape, a.color, other_size)
        specs[0] = _Spec(a.shape, a.color, size)
    else:
        other_color = rng.choice([c for c in COLORS if c != a.color])
        specs[1] = _Spec(b.shape, other_color, a.size)
    objects = _place(rng, _shuffled_specs(rng, specs))
    if objects is None:
        return None
    question = TEMPLATES["CompareAttr"][0].format(shape=a.shape, shape2=b.shape)
    return question, answer, objects, [a.shape, b.shape], (), "common"


def _logical_obj(rng: random.Random, n: int):
    subtype = rng.choice(["or", "and"])
    answer = rng.choice(["yes", "no"])
    if subtype == "or":
        matches = (
            [(False, False)] if answer == "no" else [(True, False), (False, True), (True, True)]
        )
    else:
        matches = (
            [(True, True)] if answer == "yes" else [(True, False), (False, True), (False, False)]
        )
    match = rng.choice(matches)
    specs = _random_specs(rng, max(n, 2))
    absent = [shape for shape in SHAPES if shape not in {spec.shape for spec in specs}]
    present = list(range(len(specs)))
    rng.shuffle(present)
    descriptions = []
    for slot, is_match in enumerate(match):
        spec = specs[present[slot]]
        if is_match:
            descriptions.append((spec.color, spec.shape))
        elif not absent or rng.random() < 0.5:  # named shape present, colour wrong
            descriptions.append((rng.choice([c for c in COLORS if c != spec.color]), spec.shape))
        else:  # named shape absent
            shape = absent.pop(rng.randrange(len(absent)))
            descriptions.append((rng.choice(list(COLORS)), shape))
    objects = _place(rng, specs)
    if objects is None:
        return None
    (color, shape), (color2, shape2) = descriptions
    template = TEMPLATES["LogicalObj"][0 if subtype == "or" else 1]
    question = template.format(color=color, shape=shape, color2=color2, shape2=shape2)
    return question, answer, objects, [shape, shape2], (), subtype


def _query_attr(rng: random.Random, n: int):
    specs = _random_specs(rng, n)
    objects = _place(rng, specs)
    if objects is None:
        return None
    turn = _query(rng, objects[0])
    if turn is None:
        return None
    return turn.question, turn.answer, objects, list(turn.named), (), turn.subtype


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


def _exist(rng: random.Random, n: int):
    specs = _random_specs(rng, n)
    answer = rng.choice(["yes", "no"])
    if answer == "yes":
        shape = rng.choice(specs).shape
    else:
        shape = rng.choice([s for s in SHAPES if s not in {spec.shape for spec in specs}])
    objects = _place(rng, specs)
    if objects is None:
        return None
    question = TEMPLATES["Exist"][0].format(shape=shape)
    return question, answer, objects, [shape], (), "object"


def _with(spec: _Spec, attribute: str, value: str) -> _Spec:
    if attribute == "color":
        return _Spec(spec.shape, value, spec.size)
    return _Spec(spec.shape, spec.color, value)


def _shuffled_specs(rng: random.Random, specs: list[_Spec]) -> list[_Spec]:
    specs = list(specs)
    rng.shuffle(specs)
    return specs


def _check_type(question_type: str) -> None:
    if question_type not in _BUILDERS:
        raise ValueError(
            f"unknown question type {question_type!r}; known: {', '.join(QUESTION_TYPES)}"
        )


_BUILDERS = {
    "ChooseAttr": _choose_attr,
    "ChooseCat": _choose_cat,
    "ChooseRel": _choose_rel,
    "CompareAttr": _compare_attr,
    "LogicalObj": _logical_obj,
    "QueryAttr": _query_attr,
    "Exist": _exist,
}
