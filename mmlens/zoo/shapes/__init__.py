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

The generator lives in four modules, and this package re-exports their names:

- `mmlens.zoo.shapes.scene`: the objects, their placement on the patch grid and their drawing
  (`ShapeObject`, `render_scene`, `COLORS`, `SHAPES`, `SIZES`, ...).
- `mmlens.zoo.shapes.questions`: the question types, templates and answers, and `ask` (a
  question about a given scene, as a `Turn`).
- `mmlens.zoo.shapes.builders`: one sample builder per question type (a scene made for its
  question).
- `mmlens.zoo.shapes.samples`: `ShapesSample`, `generate`, `make_sample`, `counterfactual` and
  `conversation`.

Examples:
    >>> from mmlens.zoo.shapes import generate
    >>> sample = generate(7, seed=0)[0]
    >>> sample.question_type, sample.question, sample.answer
    ('ChooseAttr', 'Is the star blue or red?', 'red')
    >>> sample.image.size, sample.boxes
    ((112, 112), ((2, 71, 39, 106),))
"""

from __future__ import annotations

from mmlens.zoo.shapes.questions import (
    ANSWERS,
    MIDDLE_BAND,
    MIN_SEPARATION,
    QUESTION_TYPES,
    TEMPLATE,
    TEMPLATES,
    Turn,
    ask,
    vocabulary,
)
from mmlens.zoo.shapes.samples import (
    ShapesSample,
    conversation,
    counterfactual,
    generate,
    make_sample,
)
from mmlens.zoo.shapes.scene import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    MARGIN,
    N_OBJECTS,
    PATCH,
    SHAPES,
    SIZES,
    Box,
    ShapeObject,
    render_scene,
)

__all__ = [
    "ANSWERS",
    "BACKGROUND",
    "Box",
    "COLORS",
    "IMAGE_SIZE",
    "MARGIN",
    "MIDDLE_BAND",
    "MIN_SEPARATION",
    "N_OBJECTS",
    "PATCH",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "ShapeObject",
    "ShapesSample",
    "TEMPLATE",
    "TEMPLATES",
    "Turn",
    "ask",
    "conversation",
    "counterfactual",
    "generate",
    "make_sample",
    "render_scene",
    "vocabulary",
]
