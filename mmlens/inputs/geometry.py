"""Single-crop pixel geometry: how an HF image processor maps an original image's pixels to
patches (pad to square, resize, centre crop), so that a box in original-image pixels becomes the
patches it touches. A family whose images are tiled or read through queries builds its own
geometry on top of this one (docs/architecture.md, "The family contract")."""

from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from PIL import Image
from torch import Tensor
from transformers.image_utils import get_image_size, to_numpy_array

from mmlens.inputs.layout import QUERY, Box, ImageTokenLayout


@dataclass(frozen=True)
class ImageGeometry:
    """Where the pixels of one original image end up in the vision tower's input.

    The image processor pads the image to a square (if `do_pad`; image centred, mean colour),
    resizes it, and centre-crops it (zero-padding where the crop is larger). Sizes are
    ``(height, width)``, offsets ``(top, left)``:

    Attributes:
        original_size: the image as given.
        pad_offset: where the original image sits in the padded canvas.
        padded_size: the canvas after padding (= `original_size` without padding).
        resized_size: after resizing.
        crop_offset: top-left of the crop window in the resized image (negative where the
            crop is larger than the image).
        processed_size: the pixel values the vision tower sees.
        patch_size: side of a patch in processed pixels.
        newline: whether the model ends the image's tokens with one `image_newline` token
            (a tiling family's untiled images, as in a prompt with several images).

    Examples:
        >>> processor = model.processor.image_processor   # llava-1.5's, at 112 px
        >>> geometry = ImageGeometry.from_image_processor(processor, (50, 90), 14)
        >>> geometry.resized_size, geometry.grid_size
        ((112, 112), (8, 8))
    """

    original_size: tuple[int, int]
    pad_offset: tuple[int, int]
    padded_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_offset: tuple[int, int]
    processed_size: tuple[int, int]
    patch_size: int
    newline: bool = False

    n_crops = 1
    """The vision tower sees one crop of the image."""
    tile_grid = None
    """Not tiled (`mmlens.models.family.ImageTokenGeometry`)."""

    @property
    def vision_view(self) -> ImageGeometry:
        """This geometry itself: the one crop the vision tower sees."""
        return self

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch rows and columns (trailing pixels that fill no whole patch are not seen)."""
        return self.processed_size[0] // self.patch_size, self.processed_size[1] // self.patch_size

    @classmethod
    def from_image_processor(
        cls, image_processor: Any, original_size: tuple[int, int], patch_size: int
    ) -> ImageGeometry:
        """The geometry that `image_processor` (a llava-hf or CLIP image processor) applies.

        Supports padding to a square (llava image processors' `do_pad`), resizing to
        ``shortest_edge`` (HF's rounding: the long side becomes ``int(edge * long / short)``) or to
        ``height``/``width``, and centre cropping.

        Raises:
            ValueError: a setting this geometry does not model (e.g. `longest_edge` resizing).
        """
        height, width = original_size
        pad_top = pad_left = 0
        if getattr(image_processor, "do_pad", False):
            if "LlavaImageProcessor" not in type(image_processor).__name__:
                raise ValueError(
                    f"do_pad=True of {type(image_processor).__name__} is not modelled; only llava "
                    "image processors (pad to square) are supported"
                )
            side = max(height, width)
            pad_top, pad_left = (side - height) // 2, (side - width) // 2
            height = width = side
        padded_size = (height, width)

        if getattr(image_processor, "do_resize", True):
            size = image_processor.size
            shortest_edge = size_field(size, "shortest_edge")
            unsupported = [key for key in ("longest_edge", "max_height", "max_width")
                           if size_field(size, key)]  # fmt: skip
            if shortest_edge and not unsupported:
                short, long = (width, height) if width <= height else (height, width)
                new_long = int(shortest_edge * long / short)  # HF's get_resize_output_image_size
                height, width = (
                    (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)
                )
            elif size_field(size, "height") and size_field(size, "width") and not unsupported:
                height, width = size_field(size, "height"), size_field(size, "width")
            else:
                raise ValueError(f"resizing to {size} is not modelled by ImageGeometry")
        resized_size = (height, width)

        crop_top = crop_left = 0
        if getattr(image_processor, "do_center_crop", False):
            crop = image_processor.crop_size
            crop_height, crop_width = size_field(crop, "height"), size_field(crop, "width")
            crop_top, crop_left = (height - crop_height) // 2, (width - crop_width) // 2
            height, width = crop_height, crop_width
        return cls(
            original_size=tuple(original_size),
            pad_offset=(pad_top, pad_left),
            padded_size=padded_size,
            resized_size=resized_size,
            crop_offset=(crop_top, crop_left),
            processed_size=(height, width),
            patch_size=patch_size,
        )

    @classmethod
    def padded_square(
        cls,
        original_size: tuple[int, int],
        processed_size: tuple[int, int],
        patch_size: int,
        newline: bool = False,
    ) -> ImageGeometry:
        """An image padded to a square (centred, as `expand2square` and HF's `pad_to_square`)
        and resized to `processed_size`, no crop (with `newline`: a tiling family's image that
        is not tiled, one of several in a prompt).

        >>> ImageGeometry.padded_square((50, 90), (28, 28), 7).pad_offset
        (20, 0)
        """
        height, width = original_size
        side = max(height, width)
        return cls(
            original_size=tuple(original_size),
            pad_offset=((side - height) // 2, (side - width) // 2),
            padded_size=(side, side),
            resized_size=tuple(processed_size),
            crop_offset=(0, 0),
            processed_size=tuple(processed_size),
            patch_size=patch_size,
            newline=newline,
        )

    def n_image_tokens(self, has_cls: bool) -> int:
        """Image tokens of this image: one per patch, plus the CLS token if `has_cls` and the
        newline token if `newline`."""
        return self.grid_size[0] * self.grid_size[1] + has_cls + self.newline

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        """The layout of this image's tokens at `positions` of batch item `item`."""
        return ImageTokenLayout.for_image(
            item=item,
            image=image,
            positions=positions,
            grid_size=self.grid_size,
            has_cls=has_cls,
            newline=self.newline,
        )

    def patch_ranges_per_grid(self, box: Box) -> dict[str, tuple[range, range]]:
        """``{"base": patch_ranges(box)}``: the one grid of a single-crop image."""
        return {"base": self.patch_ranges(box)}

    def patch_ranges(self, box: Box) -> tuple[range, range]:
        """Patch rows and columns that the pixels of `box` land in.

        `box` is ``(x0, y0, x1, y1)`` in original-image pixels, x1 and y1 exclusive (as PIL's
        crop boxes): it holds the pixels ``x0 <= x < x1``, ``y0 <= y < y1``.

        A pixel lands where the processor's resampling puts it, axis by axis: in every processed
        pixel whose centre lies in the pixel's scaled extent (enlarging), and in the processed
        pixel that contains the pixel's scaled centre (always; this is where a pixel goes when
        shrinking). At exact ties a centre belongs to the pixel starting there. This is how a box
        filter resamples; bicubic resampling (llava's) also bleeds each pixel into ~2 neighbours
        on each side, which is ignored here. Pixels cropped away land nowhere.

        Returns:
            ``(rows, cols)``: the patches with ``row in rows and col in cols`` are hit (both
            ranges are empty when the whole box is cropped away).

        Raises:
            ValueError: the box is empty, not integral, or not inside the original image.
        """
        height, width = self.original_size
        try:
            finite = len(box) == 4 and all(math.isfinite(float(value)) for value in box)
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise ValueError(
                f"box must be four finite integers (x0, y0, x1, y1), got {box!r}; NaN and "
                "infinite coordinates name no pixels"
            )
        if any(int(value) != value for value in box):
            raise ValueError(f"box must be four integers (x0, y0, x1, y1), got {box!r}")
        x0, y0, x1, y1 = (int(value) for value in box)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(
                f"box {box!r} must satisfy 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for "
                f"this image of width {width} and height {height} (x1, y1 exclusive)"
            )
        rows = self._axis_patches(y0, y1, axis=0)
        cols = self._axis_patches(x0, x1, axis=1)
        if not rows or not cols:
            return range(0), range(0)
        return rows, cols

    def _axis_patches(self, start: int, stop: int, axis: int) -> range:
        """Patch indices along `axis` hit by original pixels ``start <= i < stop``."""
        source, target = self.padded_size[axis], self.resized_size[axis]
        a, b = start + self.pad_offset[axis], stop + self.pad_offset[axis]
        # Resized pixels whose centre j + 1/2 lies in the box's scaled extent [a, b) * target / source
        covered_first = _ceil_div(2 * a * target - source, 2 * source)
        covered_end = _ceil_div(2 * b * target - source, 2 * source)
        # Resized pixels holding the scaled centre (i + 1/2) * target / source of a box pixel i
        centre_first = (2 * a + 1) * target // (2 * source)
        centre_end = (2 * b - 1) * target // (2 * source) + 1
        first = max(min(covered_first, centre_first), 0) - self.crop_offset[axis]
        end = min(max(covered_end, centre_end), target) - self.crop_offset[axis]
        n_patches = self.grid_size[axis]
        first, end = max(first, 0), min(end, n_patches * self.patch_size)
        if first >= end:
            return range(0)
        return range(first // self.patch_size, (end - 1) // self.patch_size + 1)


def size_field(size: Any, key: str) -> int | None:
    """`size[key]` of an HF size (a dict or a `SizeDict`), None when absent."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def image_size_of(image: Any) -> tuple[int, int]:
    """(height, width) of a PIL image or of an array/tensor the processor accepts."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(int(side) for side in get_image_size(to_numpy_array(image)))


def box_from_xywh(x: int, y: int, width: int, height: int) -> Box:
    """A GQA-style ``(x, y, w, h)`` pixel box as mmlens' ``(x0, y0, x1, y1)`` (x1, y1 exclusive),
    with the Cross-modal paper's convention: its code paints a box with PIL's inclusive
    rectangle ``[x, y, x + w, y + h]``, which covers ``w + 1`` by ``h + 1`` pixels.

    >>> box_from_xywh(10, 20, 5, 3)
    (10, 20, 16, 24)
    """
    return (x, y, x + width + 1, y + height + 1)


IMAGE_MODES = ("pad", "crop", "squash")
"""How a single-crop image becomes the vision tower's square (`with_image_mode`)."""

_PIXEL_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)
_VARIANTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def processor_variants(processor: Any) -> dict:
    """The variants of `processor` made so far (an image mode's, a family's tiling rule's),
    by key: each is made once per processor object."""
    return _VARIANTS.setdefault(processor, {})


def with_image_mode(processor: Any, mode: str | None) -> Any:
    """`processor` whose image processor gives single-crop images the geometry `mode`:

    - ``"pad"``: pad to a square with the mean colour (``int(255 * mean)`` per channel), image
      centred, then the checkpoint's resize and centre crop: the original LLaVA
      (``image_aspect_ratio="pad"``, `expand2square`), what both papers fed their models.
    - ``"crop"``: no padding: the shorter side is resized and the longer one centre-cropped
      (what llava-hf 1.5 checkpoints' CLIP processor does as shipped).
    - ``"squash"``: resize to the square input size, no crop (the aspect ratio is not kept).
    - None: the checkpoint's processor as it is.

    The image processor is a `LlavaImageProcessorPil` with the checkpoint's pixel settings;
    `ImageGeometry` follows it, so `patches_in_box` does too. Computed once per processor and
    mode.

    Examples:
        >>> inp = model.prepare(image, "What is left of the star?", image_mode="pad")
        >>> inp.settings["image_mode"]
        'pad'
    """
    if mode is None:
        return processor
    if mode not in IMAGE_MODES:
        raise ValueError(f"image_mode={mode!r}: use one of {', '.join(IMAGE_MODES)} or None")
    image_processor = processor.image_processor
    cached = processor_variants(processor)
    if mode not in cached:
        from transformers import LlavaImageProcessorPil

        settings = {
            name: getattr(image_processor, name)
            for name in _PIXEL_SETTINGS
            if getattr(image_processor, name, None) is not None
        }
        if mode == "squash":
            side = settings["crop_size"] if settings.get("do_center_crop") else settings["size"]
            height = size_field(side, "height") or size_field(side, "shortest_edge")
            width = size_field(side, "width") or size_field(side, "shortest_edge")
            settings.update(size={"height": height, "width": width}, do_center_crop=False)
        variant = copy.copy(processor)
        variant.image_processor = LlavaImageProcessorPil(**settings, do_pad=mode == "pad")
        cached[mode] = variant
    return cached[mode]


@dataclass(frozen=True)
class QueryGeometry:
    """An image read through learned queries (a connector of learned queries): the vision tower sees
    its pixels as `vision` says, but the decoder receives `n_queries` query tokens, each a
    mixture over every patch (through the connector's cross-attention, hooked at
    `pattern_hook`), so decoder positions have no patch grid
    (`mmlens.models.family.ImageTokenGeometry`; maps reach the patches through the model's
    `tokens_to_patches`).

    Examples:
        >>> geometry = blip_model.prepare(image, "What is it?").image_geometry[0]
        >>> geometry.n_queries, geometry.vision.grid_size
        (8, (4, 4))
    """

    vision: ImageGeometry
    n_queries: int
    pattern_hook: str
    n_crops = 1
    tile_grid = None

    @property
    def original_size(self) -> tuple[int, int]:
        return self.vision.original_size

    @property
    def processed_size(self) -> tuple[int, int]:
        return self.vision.processed_size

    @property
    def vision_view(self) -> ImageGeometry:
        """The vision tower's single crop: where maps over the image are drawn."""
        return self.vision

    def n_image_tokens(self, has_cls: bool) -> int:
        """The decoder's image tokens: one per query."""
        return self.n_queries

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        """The queries in order: `col` is the query's index, `row` -1, tile 0, kind `QUERY`."""
        n_tokens = positions.numel()
        return ImageTokenLayout(
            item=torch.full((n_tokens,), item),
            position=positions.to(torch.long),
            image=torch.full((n_tokens,), image),
            tile=torch.zeros(n_tokens, dtype=torch.long),
            row=torch.full((n_tokens,), -1),
            col=torch.arange(n_tokens),
            kind=torch.full((n_tokens,), QUERY),
        )

    def patch_ranges_per_grid(self, box: Box) -> dict[str, tuple[range, range]]:
        raise ValueError(
            f"this model's image tokens are {self.n_queries} learned queries, each a mixture of "
            "every patch, not patches: no decoder position shows a box. The vision tower's "
            "patches do (inp.image_geometry[image].vision.patch_ranges(box) on its patch grid), "
            f"and the queries' attention to them is {self.pattern_hook} (docs/checkpoints.md)"
        )
