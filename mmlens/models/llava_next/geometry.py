"""LLaVA-NeXT's image geometry (also LLaVA-OneVision's): anyres tiles, unpadding, the
downsampled token grid, and the processor variant that tiles by the original code's rule.

The model (`HookedLlavaNext.pack_image`), the inputs (`AnyresGeometry`: layout and
`patches_in_box`) and the analyses (LLaVA-CAM's tile canvas, through `AnyresGrid.pack`) all
read `AnyresGrid`, so they cannot disagree (docs/architecture.md, "The family contract").
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution

from mmlens.inputs.adapters import ProcessorAdapter, register_adapter
from mmlens.inputs.geometry import ImageGeometry, processor_variants, size_field
from mmlens.inputs.layout import NEWLINE, PATCH, Box, ImageTokenLayout

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
    first_tile_crop: ClassVar[int] = 1
    """The tiles follow the base crop (`mmlens.models.family.TileGrid`)."""

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

    def pack(
        self, tile_features: Float[Tensor, "tile patch d"]
    ) -> Float[Tensor, "token_rows token_cols d"]:
        """The tiles' patch features laid side by side into the canvas grid, the rows (or
        columns) unpadding removes dropped, and a downsampled grid resampled bilinearly, as HF's
        `pack_image_features` does: the token grid, before the newline tokens. The model packs
        its projected features with it and LLaVA-CAM its vision-layer features.

        Examples:
            >>> grid = AnyresGrid.for_image((40, 90), [[28, 28], [28, 84]], 28, 7)
            >>> grid.tiles, grid.kept_cols     # 1 x 3 tiles of 4 x 4 patches, 2 padded columns
            ((1, 3), range(1, 11))
            >>> grid.pack(torch.zeros(grid.n_tiles, 16, 5)).shape
            torch.Size([4, 10, 5])
        """
        canvas = einops.rearrange(
            tile_features,
            "(tile_row tile_col) (row col) d -> (tile_row row) (tile_col col) d",
            tile_row=self.tiles[0],
            row=self.patches_per_tile,
        )
        kept = canvas[
            self.kept_rows.start : self.kept_rows.stop, self.kept_cols.start : self.kept_cols.stop
        ]
        if not self.downsampled:
            return kept
        channels_first = einops.rearrange(kept, "row col d -> 1 d row col")
        shrunk = F.interpolate(channels_first, list(self.token_grid), mode="bilinear")
        return einops.rearrange(shrunk, "1 d row col -> row col d")

    def describe(self) -> str:
        """The token grid in words, for figure captions."""
        if not self.downsampled:
            return "unpadded tile grid"
        rows, cols = self.unpadded_size
        return f"tile grid ({rows}x{cols} patches) downsampled"

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
    def n_crops(self) -> int:
        """The base crop and every tile."""
        return 1 + self.grid.n_tiles

    @property
    def vision_view(self) -> ImageGeometry:
        """The base crop (the whole image squashed to the vision input)."""
        return self.base

    @property
    def tile_grid(self) -> AnyresGrid:
        return self.grid

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
        side = size_field(image_processor.size, "shortest_edge")
        height, width = (size_field(image_processor.size, key) for key in ("height", "width"))
        if not side and height == width:
            side = height
        crop = (
            image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else None
        )
        crop_sides = {size_field(crop, "height"), size_field(crop, "width")} if crop else {side}
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
        rows, cols = self.base.grid_size
        n_base = rows * cols
        base = self.base.token_layout(
            item=item, image=image, positions=positions[:n_base], has_cls=False
        )
        # Each row of the tile token grid, then its newline (HF's `pack_image_features`).
        rows, cols = self.grid.token_grid_size
        row = torch.arange(rows).repeat_interleave(cols + 1)
        col = torch.arange(cols + 1).repeat(rows)
        is_newline = col == cols
        col = col.masked_fill(is_newline, -1)
        tiles = ImageTokenLayout(
            item=torch.full((row.numel(),), item),
            position=positions[n_base:].to(torch.long),
            image=torch.full((row.numel(),), image),
            tile=self.grid.tile_of(row, col).masked_fill(is_newline, -1),
            row=row,
            col=col,
            kind=torch.where(is_newline, NEWLINE, PATCH),
        )
        return ImageTokenLayout.concatenate([base, tiles])

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
    cached = processor_variants(processor)
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


TILES = register_adapter(
    ProcessorAdapter(
        name="tiling (anyres)",
        matches=lambda processor: bool(
            getattr(processor.image_processor, "image_grid_pinpoints", None)
        ),
        geometry=lambda processor, size, alone, patch_size, anyres: (
            AnyresGeometry.from_image_processor(processor.image_processor, size, patch_size, anyres)
        ),
        options=("anyres",),
        with_anyres=with_anyres,
    )
)
"""LLaVA-NeXT's HF processor: every image tiled (`AnyresGeometry`), by rule `anyres`."""
