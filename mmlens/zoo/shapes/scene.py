"""Scenes of the shapes VQA: the objects (`ShapeObject`: shape, colour, size), their places on
the 14-px patch grid (a cell of 2 x 2 or 3 x 3 patches each, no patch shared) and their drawing
(`render_scene`), with the constants that define them (`IMAGE_SIZE`, `COLORS`, `SHAPES`, `SIZES`,
`PATCH`, `MARGIN`, `N_OBJECTS`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]

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

N_OBJECTS = (2, 3, 4)
"""How many objects a scene holds (uniform)."""


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
