"""Pixel geometry: how the HF image processors map an original image's pixels to patches
(pad to square, resize, centre crop; LLaVA-NeXT's anyres tiling and unpadding), so that a box
in original-image pixels becomes the image tokens it touches."""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jaxtyping import Int
from PIL import Image
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import get_image_size, to_numpy_array

from mmlens.inputs.layout import Box, ImageTokenLayout


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
            (LLaVA-OneVision's images in a prompt with several images).

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
            shortest_edge = _size_field(size, "shortest_edge")
            unsupported = [key for key in ("longest_edge", "max_height", "max_width")
                           if _size_field(size, key)]  # fmt: skip
            if shortest_edge and not unsupported:
                short, long = (width, height) if width <= height else (height, width)
                new_long = int(shortest_edge * long / short)  # HF's get_resize_output_image_size
                height, width = (
                    (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)
                )
            elif _size_field(size, "height") and _size_field(size, "width") and not unsupported:
                height, width = _size_field(size, "height"), _size_field(size, "width")
            else:
                raise ValueError(f"resizing to {size} is not modelled by ImageGeometry")
        resized_size = (height, width)

        crop_top = crop_left = 0
        if getattr(image_processor, "do_center_crop", False):
            crop = image_processor.crop_size
            crop_height, crop_width = _size_field(crop, "height"), _size_field(crop, "width")
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
        and resized to `processed_size`, no crop: LLaVA-OneVision's images in a prompt with
        several images (with `newline`).

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
        """``{"base": patch_ranges(box)}``: the one grid of a LLaVA-1.5 image (see `AnyresGeometry`)."""
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
        if len(box) != 4 or any(int(value) != value for value in box):
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


ANYRES_RULES = ("hf", "llava")
"""How LLaVA-NeXT picks an image's tile canvas and unpads its features:

- ``"hf"``: Hugging Face's port. Sizes and grid pinpoints are read as (height, width); unpadding
  keeps ``int(round(x, 7))`` rows or columns.
- ``"llava"``: the original LLaVA-NeXT code, which both papers ran. Sizes and pinpoints are read
  as (width, height), so where two canvases tie (e.g. every image with both sides <= 336 px) the
  other one wins; unpadding keeps ``int(x)`` (e.g. 704 x 396 px: 1,850 image tokens instead of
  1,948).
"""


def _check_anyres(anyres: str) -> None:
    if anyres not in ANYRES_RULES:
        raise ValueError(f"anyres={anyres!r}: use one of {', '.join(ANYRES_RULES)}")


def pinpoints_as_height_width(
    grid_pinpoints: Sequence[Sequence[int]], anyres: str
) -> list[list[int]]:
    """The checkpoint's pinpoints as the ``[height, width]`` candidates that HF's
    `select_best_resolution` tries, in order, to choose what rule `anyres` chooses.

    HF reads each pinpoint as (height, width); the original code reads it as (width, height),
    which is HF's choice over the swapped pinpoints (same candidates, same order, axes swapped).
    """
    _check_anyres(anyres)
    if anyres == "llava":
        return [[int(second), int(first)] for first, second in grid_pinpoints]
    return [[int(first), int(second)] for first, second in grid_pinpoints]


def unpadded_ranges(
    image_size: tuple[int, int], grid_size: tuple[int, int], anyres: str
) -> tuple[range, range]:
    """The rows and columns of a canvas grid of ``(rows, cols)`` patches that unpadding keeps
    for an image of ``(height, width)`` pixels: those that show the centred image (HF's and the
    original's `unpad_image`, in patch units, with their float arithmetic; see `ANYRES_RULES`).

    >>> unpadded_ranges((396, 704), (48, 48), "hf")  # 704 x 396 px on 2 x 2 tiles of 24 patches
    (range(10, 38), range(0, 48))
    >>> unpadded_ranges((396, 704), (48, 48), "llava")
    (range(11, 37), range(0, 48))
    """
    _check_anyres(anyres)
    height, width = image_size
    rows, cols = grid_size
    kept_rows, kept_cols = range(rows), range(cols)
    if width / height > cols / rows:
        kept = _kept_length(height * (cols / width), anyres)
        padding = (rows - kept) // 2
        kept_rows = range(padding, rows - padding)
    else:
        kept = _kept_length(width * (rows / height), anyres)
        padding = (cols - kept) // 2
        kept_cols = range(padding, cols - padding)
    return kept_rows, kept_cols


def _kept_length(scaled: float, anyres: str) -> int:
    return int(scaled) if anyres == "llava" else int(round(scaled, 7))


@dataclass(frozen=True)
class AnyresGrid:
    """How LLaVA-NeXT lays out the tile features of one image (HF's `pack_image_features`).

    The best canvas for the image (`select_best_resolution` over the grid pinpoints) is cut into
    ``tiles = (rows, cols)`` tiles of ``patches_per_tile`` x ``patches_per_tile`` patches. Their
    features, side by side, form the canvas grid of ``rows * patches_per_tile`` by
    ``cols * patches_per_tile`` patches, of which unpadding keeps `kept_rows` x `kept_cols`: the
    rows (or columns) that show the centred image, computed in patch units with HF's
    `unpad_image` arithmetic. LLaVA-OneVision then shrinks a kept grid of more than about
    `max_tile_patches` patches (``anyres_max_9``: nine tiles' worth) by bilinear interpolation to
    `token_grid` (HF's `pack_image_features`); otherwise the token grid is the kept grid. The
    model reads the token grid row by row, each row followed by one newline token. The model
    (`HookedLlavaNext`, `HookedLlavaOnevision`) and the inputs (`AnyresGeometry`) both use this
    class, so they cannot disagree.

    Examples:
        >>> grid = AnyresGrid.for_image((480, 640), [[336, 672], [672, 336], [672, 672]], 336, 14)
        >>> grid.tiles, grid.kept_rows, grid.kept_cols
        ((2, 2), range(6, 42), range(0, 48))
        >>> grid.unpadded_size, grid.n_tokens
        ((36, 48), 1764)
        >>> pinpoints = [[384 * rows, 384 * cols] for rows in range(1, 7) for cols in range(1, 7)]
        >>> onevision = AnyresGrid.for_image((480, 640), pinpoints, 384, 14, max_tile_patches=9)
        >>> onevision.tiles, onevision.unpadded_size, onevision.token_grid_size, onevision.n_tokens
        ((2, 2), (40, 54), (40, 54), 2200)
        >>> full_hd = AnyresGrid.for_image((1080, 1920), pinpoints, 384, 14, max_tile_patches=9)
        >>> full_hd.tiles, full_hd.unpadded_size, full_hd.token_grid_size   # downsampled
        ((3, 5), (75, 135), (60, 108))
    """

    tiles: tuple[int, int]
    patches_per_tile: int
    kept_rows: range
    kept_cols: range
    token_grid: tuple[int, int] | None = None
    """Rows and columns of tokens the model reads: the kept grid, or (LLaVA-OneVision) its
    bilinear downsampling; None means the kept grid."""

    @classmethod
    def for_image(
        cls,
        image_size: tuple[int, int],
        grid_pinpoints: Sequence[Sequence[int]],
        tile_size: int,
        patch_size: int,
        anyres: str = "hf",
        max_tile_patches: int | None = None,
    ) -> AnyresGrid:
        """The grid for an image of ``(height, width)`` `image_size`.

        Args:
            image_size: the original image's (height, width).
            grid_pinpoints: the checkpoint's candidate canvas sizes (its config's
                ``image_grid_pinpoints``), multiples of `tile_size`.
            tile_size: side of a tile in pixels (the vision tower's input size).
            patch_size: side of a vision patch in pixels.
            anyres: ``"hf"`` (Hugging Face's LLaVA-NeXT) or ``"llava"`` (the original code):
                see `ANYRES_RULES`.
            max_tile_patches: LLaVA-OneVision's ``anyres_max_N``: N, the number of tiles' worth
                of patches above which (by a factor 1.1 in side) the kept grid is downsampled;
                None (LLaVA-NeXT) keeps it.

        Examples:
            >>> pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            >>> AnyresGrid.for_image((200, 300), pinpoints, 336, 14).tiles  # HF: 1 x 2 tiles
            (1, 2)
            >>> AnyresGrid.for_image((200, 300), pinpoints, 336, 14, anyres="llava").tiles
            (2, 1)
        """
        height, width = (int(side) for side in image_size)
        best_height, best_width = select_best_resolution(
            (height, width), pinpoints_as_height_width(grid_pinpoints, anyres)
        )
        tiles = (best_height // tile_size, best_width // tile_size)
        per_tile = tile_size // patch_size
        rows, cols = tiles[0] * per_tile, tiles[1] * per_tile
        kept_rows, kept_cols = unpadded_ranges((height, width), (rows, cols), anyres)
        token_grid = None
        if max_tile_patches is not None:
            kept = len(kept_rows) * len(kept_cols)
            # HF's pack_image_features (and its processor's token count), float for float
            ratio = math.sqrt(kept / (max_tile_patches * per_tile**2))
            if ratio > 1.1:
                token_grid = (int(len(kept_rows) // ratio), int(len(kept_cols) // ratio))
        return cls(tiles, per_tile, kept_rows, kept_cols, token_grid)

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def unpadded_size(self) -> tuple[int, int]:
        """Rows and columns of the unpadded grid."""
        return len(self.kept_rows), len(self.kept_cols)

    @property
    def downsampled(self) -> bool:
        """Whether the model reads a bilinear downsampling of the unpadded grid (OneVision)."""
        return self.token_grid is not None  # only set when the grid shrinks

    @property
    def token_grid_size(self) -> tuple[int, int]:
        """Rows and columns of the tile tokens the model reads (before the newlines)."""
        return self.token_grid or self.unpadded_size

    @property
    def n_tokens(self) -> int:
        """Tokens of the tile part: every token-grid cell plus one newline per row."""
        rows, cols = self.token_grid_size
        return rows * (cols + 1)

    def tile_of(self, row: Int[Tensor, "n"], col: Int[Tensor, "n"]) -> Int[Tensor, "n"]:
        """The tile (1, 2, ... row-major) holding token-grid cell (`row`, `col`): the tile of
        that unpadded-grid patch or, for a downsampled grid, of the patch under the cell's
        centre."""
        if self.downsampled:
            (rows, cols), (token_rows, token_cols) = self.unpadded_size, self.token_grid_size
            row = ((2 * row + 1) * rows) // (2 * token_rows)
            col = ((2 * col + 1) * cols) // (2 * token_cols)
        tile_row = (row + self.kept_rows.start) // self.patches_per_tile
        tile_col = (col + self.kept_cols.start) // self.patches_per_tile
        return 1 + tile_row * self.tiles[1] + tile_col

    def token_ranges(self, rows: range, cols: range) -> tuple[range, range]:
        """The token-grid rows and columns whose features draw on unpadded-grid patches
        ``rows`` x ``cols``: the ranges themselves, or for a downsampled grid every cell whose
        bilinear interpolation gives some weight to one of them (`bilinear_sources`)."""
        if not self.downsampled:
            return rows, cols
        (source_rows, source_cols), (token_rows, token_cols) = (
            self.unpadded_size,
            self.token_grid_size,
        )
        return (
            _cells_reading(rows, source_rows, token_rows),
            _cells_reading(cols, source_cols, token_cols),
        )


def bilinear_sources(index: int, source: int, target: int) -> list[int]:
    """The source indices that output `index` of a bilinear resize from `source` to `target`
    samples with a non-zero weight (PyTorch's ``interpolate(mode="bilinear",
    align_corners=False)`` along one axis, given the output size), in exact arithmetic: where
    the sampling point falls on a source centre, floating point may give the neighbour a
    weight of order 1e-7 (float32), which is not counted.

    >>> bilinear_sources(0, 10, 5), bilinear_sources(4, 10, 5)  # centres at 0.5 and 8.5
    ([0, 1], [8, 9])
    >>> bilinear_sources(1, 9, 3)                               # centre exactly on source 4
    [4]
    """
    # Sampling point (index + 1/2) * source / target - 1/2 = numerator / denominator, clamped at 0
    numerator, denominator = (2 * index + 1) * source - target, 2 * target
    if numerator <= 0:
        return [0]
    first = numerator // denominator
    if numerator % denominator == 0 or first >= source - 1:
        return [min(first, source - 1)]
    return [first, first + 1]


def _cells_reading(hit: range, source: int, target: int) -> range:
    """Output cells of a `source` -> `target` bilinear resize that read a source index in `hit`
    (contiguous, since the sources move monotonically with the output index)."""
    cells = [i for i in range(target) if any(s in hit for s in bilinear_sources(i, source, target))]
    return range(cells[0], cells[-1] + 1) if cells else range(0)


@dataclass(frozen=True)
class AnyresGeometry:
    """Where the pixels of one image end up in LLaVA-NeXT's base crop and tiles.

    The LLaVA-NeXT image processor makes two views of the image: the base crop, the whole image
    resized (squashed, aspect ratio not kept) to the vision input size; and the canvas, the image
    resized to fit the best resolution keeping its aspect ratio (HF's `get_patch_output_size`),
    centred on a black canvas of that size, cut into tiles. The model then drops the canvas rows
    or columns that unpadding removes (`AnyresGrid`).

    Attributes:
        base: geometry of the base crop.
        canvas: geometry of the canvas: `processed_size` is the canvas, `crop_offset` is minus
            the image's offset in it, the patch grid is the canvas grid of all tiles.
        grid: tiles and unpadding.

    Examples:
        >>> processor = next_model.processor.image_processor    # a LLaVA-NeXT's
        >>> geometry = AnyresGeometry.from_image_processor(processor, (40, 90), 7)
        >>> geometry.grid.tiles, geometry.canvas.resized_size
        ((1, 3), (28, 63))
    """

    base: ImageGeometry
    canvas: ImageGeometry
    grid: AnyresGrid

    @property
    def original_size(self) -> tuple[int, int]:
        return self.base.original_size

    @property
    def processed_size(self) -> tuple[int, int]:
        """Size of each crop the vision tower sees (the base crop and every tile)."""
        return self.base.processed_size

    @classmethod
    def from_image_processor(
        cls,
        image_processor: Any,
        original_size: tuple[int, int],
        patch_size: int,
        anyres: str = "hf",
        max_tile_patches: int | None = None,
    ) -> AnyresGeometry:
        """The geometry that a llava-hf LLaVA-NeXT image processor applies (with the canvas and
        unpadding of rule `anyres`, `ANYRES_RULES`; `image_processor` is the checkpoint's), or
        LLaVA-OneVision's, whose tile grid is downsampled above `max_tile_patches` tiles' worth
        of patches (`AnyresGrid.for_image`).

        Supports the llava-v1.6 settings: the crop size (``size`` as ``shortest_edge`` or a
        square ``height``/``width``, and ``crop_size`` if centre cropping) is one square side,
        so the per-crop resize and crop change nothing.

        Raises:
            ValueError: settings this geometry does not model.
        """
        side = _size_field(image_processor.size, "shortest_edge")
        height, width = (_size_field(image_processor.size, key) for key in ("height", "width"))
        if not side and height == width:
            side = height
        crop = (
            image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else None
        )
        crop_sides = {_size_field(crop, "height"), _size_field(crop, "width")} if crop else {side}
        if not side or crop_sides != {side}:
            raise ValueError(
                f"LLaVA-NeXT image processor with size={image_processor.size} and "
                f"crop_size={crop}: only one square crop side (size == crop_size, as in "
                "llava-v1.6) is modelled"
            )
        grid = AnyresGrid.for_image(
            original_size,
            image_processor.image_grid_pinpoints,
            side,
            patch_size,
            anyres,
            max_tile_patches,
        )
        canvas_size = (grid.tiles[0] * side, grid.tiles[1] * side)
        resized = _fit_keeping_aspect_ratio(original_size, canvas_size)
        paste = ((canvas_size[0] - resized[0]) // 2, (canvas_size[1] - resized[1]) // 2)
        original_size = tuple(original_size)
        return cls(
            base=ImageGeometry(
                original_size=original_size,
                pad_offset=(0, 0),
                padded_size=original_size,
                resized_size=(side, side),
                crop_offset=(0, 0),
                processed_size=(side, side),
                patch_size=patch_size,
            ),
            canvas=ImageGeometry(
                original_size=original_size,
                pad_offset=(0, 0),
                padded_size=original_size,
                resized_size=resized,
                crop_offset=(-paste[0], -paste[1]),
                processed_size=canvas_size,
                patch_size=patch_size,
            ),
            grid=grid,
        )

    def n_image_tokens(self, has_cls: bool) -> int:
        """Base patches + kept tile patches + one newline per kept row."""
        if has_cls:
            raise ValueError(
                "vision_feature_select_strategy='full' (CLS tokens kept) is not supported for "
                "LLaVA-NeXT images: HF's LlavaNext cannot pack tiles with a CLS token either; "
                "use 'default'"
            )
        rows, cols = self.base.grid_size
        return rows * cols + self.grid.n_tokens

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        """The layout of this image's tokens at `positions` of batch item `item`."""
        self.n_image_tokens(has_cls)  # raises for CLS tokens
        return ImageTokenLayout.for_anyres_image(
            item=item,
            image=image,
            positions=positions,
            base_grid_size=self.base.grid_size,
            grid=self.grid,
        )

    def patch_ranges_per_grid(self, box: Box) -> dict[str, tuple[range, range]]:
        """Patch ranges that `box` hits: ``"base"`` in the base grid, ``"tiles"`` in the token
        grid: the unpadded grid (empty where the box only reaches canvas rows or columns that
        unpadding removed) or, where LLaVA-OneVision downsamples it, the cells that interpolate
        from a hit patch (`AnyresGrid.token_ranges`). Pixel rule as in
        `ImageGeometry.patch_ranges`."""
        rows, cols = self.canvas.patch_ranges(box)
        kept_rows = _shifted_intersection(rows, self.grid.kept_rows)
        kept_cols = _shifted_intersection(cols, self.grid.kept_cols)
        if not kept_rows or not kept_cols:
            return {"base": self.base.patch_ranges(box), "tiles": (range(0), range(0))}
        return {
            "base": self.base.patch_ranges(box),
            "tiles": self.grid.token_ranges(kept_rows, kept_cols),
        }


@dataclass(frozen=True)
class QueryGeometry:
    """An InstructBLIP image: the vision tower sees its pixels as `vision` says, but the
    decoder receives `n_queries` Q-Former query tokens, each a mixture over every patch (through
    the Q-Former's cross-attention), so decoder positions have no patch grid.

    Examples:
        >>> geometry = blip_model.prepare(image, "What is it?").image_geometry[0]
        >>> geometry.n_queries, geometry.vision.grid_size
        (8, (4, 4))
    """

    vision: ImageGeometry
    n_queries: int

    @property
    def original_size(self) -> tuple[int, int]:
        return self.vision.original_size

    @property
    def processed_size(self) -> tuple[int, int]:
        return self.vision.processed_size

    def n_image_tokens(self, has_cls: bool) -> int:
        """The decoder's image tokens: one per query."""
        return self.n_queries

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        return ImageTokenLayout.for_queries(item=item, image=image, positions=positions)

    def patch_ranges_per_grid(self, box: Box) -> dict[str, tuple[range, range]]:
        raise ValueError(
            "this model's image tokens are InstructBLIP's Q-Former queries, not patches: no "
            "decoder position shows a box. The vision tower's patches do "
            "(inp.image_geometry[image].vision.patch_ranges(box) on its patch grid), and the "
            "queries' cross-attention to them is qformer.blocks.{l}.cross_attn.hook_pattern "
            "(docs/checkpoints.md, InstructBLIP)"
        )


def processor_geometry(
    image_processor: Any, original_size: tuple[int, int], patch_size: int, anyres: str = "hf"
) -> ImageGeometry | AnyresGeometry:
    """The geometry of `image_processor`: `AnyresGeometry` (with rule `anyres`) if it tiles
    (``image_grid_pinpoints``, LLaVA-NeXT), else `ImageGeometry`."""
    if tiles_images(image_processor):
        return AnyresGeometry.from_image_processor(
            image_processor, original_size, patch_size, anyres
        )
    return ImageGeometry.from_image_processor(image_processor, original_size, patch_size)


def tiles_images(image_processor: Any) -> bool:
    """Whether `image_processor` tiles images (LLaVA-NeXT's anyres) rather than making one crop."""
    return bool(getattr(image_processor, "image_grid_pinpoints", None))


def _fit_keeping_aspect_ratio(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The size that `size` (height, width) is resized to inside `target`, aspect ratio kept
    (HF's `get_patch_output_size`: the tighter side fills the target, the other rounds up)."""
    (height, width), (target_height, target_width) = size, target
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


def _shifted_intersection(hit: range, kept: range) -> range:
    """`hit` ∩ `kept`, renumbered so that `kept.start` becomes 0."""
    start, stop = max(hit.start, kept.start), min(hit.stop, kept.stop)
    return range(start - kept.start, stop - kept.start) if start < stop else range(0)


def _size_field(size: Any, key: str) -> int | None:
    """`size[key]` of an HF size (a dict or a `SizeDict`), None when absent."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _image_size(image: Any) -> tuple[int, int]:
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
"""How a LLaVA-1.5 image becomes the vision tower's square (`with_image_mode`)."""

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
"""Per processor: its variants for image modes and anyres rules, made once."""


def with_image_mode(processor: Any, mode: str | None) -> Any:
    """`processor` whose image processor gives LLaVA-1.5 images the geometry `mode`:

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
    if tiles_images(image_processor):
        raise ValueError(
            "image_mode applies to LLaVA-1.5's single-crop processor; a LLaVA-NeXT processor "
            "tiles the image (anyres) and keeps its own geometry"
        )
    cached = _VARIANTS.setdefault(processor, {})
    if mode not in cached:
        from transformers import LlavaImageProcessorPil

        settings = {
            name: getattr(image_processor, name)
            for name in _PIXEL_SETTINGS
            if getattr(image_processor, name, None) is not None
        }
        if mode == "squash":
            side = settings["crop_size"] if settings.get("do_center_crop") else settings["size"]
            height = _size_field(side, "height") or _size_field(side, "shortest_edge")
            width = _size_field(side, "width") or _size_field(side, "shortest_edge")
            settings.update(size={"height": height, "width": width}, do_center_crop=False)
        variant = copy.copy(processor)
        variant.image_processor = LlavaImageProcessorPil(**settings, do_pad=mode == "pad")
        cached[mode] = variant
    return cached[mode]


def with_anyres(processor: Any, anyres: str) -> Any:
    """`processor` whose LLaVA-NeXT tiling follows rule `anyres` (`ANYRES_RULES`): for
    ``"llava"``, a copy whose image processor tries the pinpoints as the original code does
    and whose image-token count uses the original's unpadding; ``"hf"``: `processor` itself.
    The pixels of each canvas are then the original's (both pipelines resize, pad and cut the
    canvas alike). Made once per processor.

    Examples:
        >>> inp = next_model.prepare(image, "What is on the sign?", anyres="llava")
        >>> inp.settings["anyres"]
        'llava'
    """
    _check_anyres(anyres)
    if anyres == "hf":
        return processor
    if not tiles_images(processor.image_processor):
        raise ValueError(
            "anyres applies to LLaVA-NeXT's tiling processor; this checkpoint makes one crop per "
            "image (choose its geometry with image_mode=)"
        )
    cached = _VARIANTS.setdefault(processor, {})
    key = ("anyres", anyres)
    if key not in cached:
        image_processor = copy.deepcopy(processor.image_processor)
        image_processor.image_grid_pinpoints = pinpoints_as_height_width(
            processor.image_processor.image_grid_pinpoints, anyres
        )
        variant = copy.copy(processor)
        variant.image_processor = image_processor

        def unpadded_features(height, width, patches_height, patches_width, scale_h, scale_w):
            """The processor's image-token count for the tile part, with `anyres` unpadding."""
            grid = (patches_height * scale_h, patches_width * scale_w)
            kept_rows, kept_cols = unpadded_ranges((height, width), grid, anyres)
            return len(kept_rows) * len(kept_cols), len(kept_rows)

        # LlavaNextProcessor counts the image tokens it writes into the text with this method.
        variant._get_unpadded_features = unpadded_features
        cached[key] = variant
    return cached[key]
