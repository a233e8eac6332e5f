"""The sample builders of the shapes VQA, one per question type (`_BUILDERS`): each draws a scene
made for its question from a random generator and returns ``(question, answer, objects, named
shapes, options, subtype)``, or None where the draw failed (`make_sample` then draws again).
"""

from __future__ import annotations

import random

from mmlens.zoo.shapes.questions import MIN_SEPARATION, TEMPLATES, _query, _shuffled
from mmlens.zoo.shapes.scene import COLORS, SHAPES, SIZES, _place, _random_specs, _Spec


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


_BUILDERS = {
    "ChooseAttr": _choose_attr,
    "ChooseCat": _choose_cat,
    "ChooseRel": _choose_rel,
    "CompareAttr": _compare_attr,
    "LogicalObj": _logical_obj,
    "QueryAttr": _query_attr,
    "Exist": _exist,
}
