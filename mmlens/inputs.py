"""`MultimodalInput`: token ids and pixels that know where every segment and image patch is.

Built by `MultimodalInput.from_processor` (what `HookedLlava.prepare` calls): the prompt is
rendered with a conversation template (`mmlens.templates`), the checkpoint's own HF processor
produces the tensors (so the ids are exactly HF's), and the fast tokenizer's character offsets of
the same text give the segments. Semantics (DESIGN.md §4):

- Positions index the full padded sequence of one batch item, image tokens expanded. Batches are
  left-padded; pad positions belong to no segment.
- Segments: ``system`` = every real position before the first image token; ``image`` = the image
  tokens; ``user`` = from the first position after the image block to the last prompt position;
  ``question`` = the tokens overlapping the question's characters; ``last`` = the last prompt
  position. Text-only prompts have no image block: ``system`` ends, and ``user`` starts, at the
  first token that reaches into the user's content.
  For LLaVA-NeXT, ``image`` holds the base grid, the tiles and the newline tokens, in model order.
- Image-token layout (`ImageTokenLayout`): for every image token its batch item, image, tile
  (0 = the base image, 1.. = LLaVA-NeXT's tiles, -1 = a newline token), patch row and column, and
  kind (patch, CLS, newline).
- `MultimodalInput.patches_in_box` maps a box in original-image pixels through the processor's
  geometry (`ImageGeometry`; `AnyresGeometry` for LLaVA-NeXT's tiles) to the image tokens whose
  patches it touches.

Example:
    >>> inp = MultimodalInput.from_processor(processor, image, "What colour is the door?")
    >>> inp.positions("image")        # 576 positions for llava-1.5-7b
    >>> inp.find("door")              # the token(s) of "door"
    >>> inp.patches_in_box((0, 0, 100, 50))   # image tokens showing the top-left 100x50 pixels
    >>> logits = model(**inp.model_kwargs())  # any HF-style model call
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from PIL import Image
from torch import Tensor
from transformers.image_processing_utils import select_best_resolution
from transformers.image_utils import get_image_size, to_numpy_array

from mmlens.images import as_image
from mmlens.templates import IMAGE_PLACEHOLDER, ConversationTemplate, RenderedPrompt, render

SEGMENTS = ("system", "image", "user", "question", "last")
"""Names accepted by `MultimodalInput.positions`."""

TOKEN_KINDS = ("patch", "cls", "newline")
"""Names of the `ImageTokenLayout.kind` codes: ``TOKEN_KINDS[code]``."""
PATCH, CLS, NEWLINE = range(len(TOKEN_KINDS))

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageTokenLayout:
    """What each image token of a batch shows: one entry per image token, in sequence order.

    All fields are LongTensors of shape ``[n_image_tokens]``; `kind` holds `PATCH`, `CLS` or
    `NEWLINE` (names in `TOKEN_KINDS`).

    - `tile` is 0 for the base image (LLaVA-1.5's only image); for LLaVA-NeXT, 1, 2, ... is the
      tile a patch came from (row-major over the tile grid, HF's crop order) and -1 marks a
      newline token.
    - `row` and `col`: for the base image, the patch grid (CLS: -1, -1). For NeXT tile patches,
      the unpadded high-resolution grid: all tiles side by side, minus the rows (or columns) that
      unpadding removed, so row 0 is the first row the model kept. A newline token has the `row`
      it ends and `col` -1.

    The entries of one image are in the model's order: base grid row-major, then each kept row of
    the tile grid followed by its newline. The layout of the whole batch lists the image tokens
    in the order `hook_image_embeds` holds them.

    Example:
        >>> layout = inp.layout
        >>> layout.position[(layout.image == 0) & (layout.tile == 0) & (layout.row == 0)]  # top base row
        >>> layout.position[layout.kind == NEWLINE]  # LLaVA-NeXT's newline tokens
    """

    item: Int[Tensor, "n_image_tokens"]
    position: Int[Tensor, "n_image_tokens"]
    image: Int[Tensor, "n_image_tokens"]
    tile: Int[Tensor, "n_image_tokens"]
    row: Int[Tensor, "n_image_tokens"]
    col: Int[Tensor, "n_image_tokens"]
    kind: Int[Tensor, "n_image_tokens"]

    def __len__(self) -> int:
        return self.position.numel()

    def kind_names(self) -> list[str]:
        """`kind` as names ("patch", "cls", "newline"), one per image token."""
        return [TOKEN_KINDS[code] for code in self.kind.tolist()]

    def patch_grid(self, image: int = 0, tile: int = 0) -> Int[Tensor, "rows cols"]:
        """Sequence positions of the patch tokens of `image` / `tile`, arranged as their grid.

        Tile 0 is the base image's full patch grid. A LLaVA-NeXT tile (1, 2, ...) gives the part
        of the unpadded grid it covers: its patches that unpadding kept, as a rectangle.

        Example:
            >>> inp.layout.patch_grid(0).shape  # (24, 24) for llava-1.5 at 336 px
        """
        selected = (self.image == image) & (self.tile == tile) & (self.kind == PATCH)
        return self._grid(selected, f"image {image}, tile {tile}")

    def highres_grid(self, image: int = 0) -> Int[Tensor, "rows cols"]:
        """Sequence positions of all tile patches of a LLaVA-NeXT `image`, as the unpadded grid.

        The grid the model reads row by row (each row then followed by a newline token); newline
        tokens are not in it. ``grid[r, c]`` is the token with ``row == r`` and ``col == c``.

        Example:
            >>> inp.layout.highres_grid(0).shape  # e.g. (36, 48) for a 640 x 480 image, llava-v1.6
        """
        selected = (self.image == image) & (self.tile >= 1) & (self.kind == PATCH)
        return self._grid(selected, f"the tiles of image {image}")

    def _grid(
        self, selected: Bool[Tensor, "n_image_tokens"], what: str
    ) -> Int[Tensor, "rows cols"]:
        if not selected.any():
            raise ValueError(
                f"no patch tokens for {what}; this layout has images "
                f"{sorted(set(self.image.tolist()))} and tiles {sorted(set(self.tile.tolist()) - {-1})}"
                " (only LLaVA-NeXT images have tiles 1, 2, ...)"
            )
        rows, cols = self.row[selected], self.col[selected]
        first_row, first_col = int(rows.min()), int(cols.min())
        shape = (int(rows.max()) - first_row + 1, int(cols.max()) - first_col + 1)
        grid = torch.full(shape, -1, dtype=torch.long, device=self.position.device)
        grid[rows - first_row, cols - first_col] = self.position[selected]
        return grid

    def to(self, device: torch.device | str) -> ImageTokenLayout:
        """A copy with every tensor on `device`."""
        return ImageTokenLayout(
            **{
                field.name: getattr(self, field.name).to(device)
                for field in dataclasses.fields(self)
            }
        )

    @classmethod
    def concatenate(cls, parts: Sequence[ImageTokenLayout]) -> ImageTokenLayout:
        """One layout holding the entries of `parts` in order."""
        fields = [field.name for field in dataclasses.fields(cls)]
        if not parts:
            return cls(**{name: torch.zeros(0, dtype=torch.long) for name in fields})
        return cls(**{name: torch.cat([getattr(part, name) for part in parts]) for name in fields})

    @classmethod
    def for_image(
        cls,
        *,
        item: int,
        image: int,
        positions: Int[Tensor, "n_image_tokens"],
        grid_size: tuple[int, int],
        has_cls: bool,
    ) -> ImageTokenLayout:
        """The layout of one LLaVA-1.5 image: [CLS] then the patches in row-major order."""
        rows, cols = grid_size
        row = torch.arange(rows).repeat_interleave(cols)
        col = torch.arange(cols).repeat(rows)
        kind = torch.full((rows * cols,), PATCH)
        if has_cls:
            row, col = torch.cat([torch.tensor([-1]), row]), torch.cat([torch.tensor([-1]), col])
            kind = torch.cat([torch.tensor([CLS]), kind])
        n_tokens = kind.numel()
        return cls(
            item=torch.full((n_tokens,), item),
            position=positions.to(torch.long),
            image=torch.full((n_tokens,), image),
            tile=torch.zeros(n_tokens, dtype=torch.long),
            row=row,
            col=col,
            kind=kind,
        )

    @classmethod
    def for_anyres_image(
        cls,
        *,
        item: int,
        image: int,
        positions: Int[Tensor, "n_image_tokens"],
        base_grid_size: tuple[int, int],
        grid: AnyresGrid,
    ) -> ImageTokenLayout:
        """The layout of one LLaVA-NeXT image: the base grid row-major, then each kept row of
        the unpadded tile grid followed by a newline token (HF's `pack_image_features`)."""
        n_base = base_grid_size[0] * base_grid_size[1]
        base = cls.for_image(
            item=item,
            image=image,
            positions=positions[:n_base],
            grid_size=base_grid_size,
            has_cls=False,
        )
        rows, cols = grid.unpadded_size
        row = torch.arange(rows).repeat_interleave(cols + 1)
        col = torch.arange(cols + 1).repeat(rows)
        is_newline = col == cols
        col = col.masked_fill(is_newline, -1)
        tile = grid.tile_of(row, col).masked_fill(is_newline, -1)
        tiles = cls(
            item=torch.full((row.numel(),), item),
            position=positions[n_base:].to(torch.long),
            image=torch.full((row.numel(),), image),
            tile=tile,
            row=row,
            col=col,
            kind=torch.where(is_newline, NEWLINE, PATCH),
        )
        return cls.concatenate([base, tiles])


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

    Example:
        >>> geometry = ImageGeometry.from_image_processor(processor.image_processor, (50, 90), 14)
        >>> geometry.pad_offset, geometry.grid_size
        ((20, 0), (4, 4))
    """

    original_size: tuple[int, int]
    pad_offset: tuple[int, int]
    padded_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_offset: tuple[int, int]
    processed_size: tuple[int, int]
    patch_size: int

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

    def n_image_tokens(self, has_cls: bool) -> int:
        """Image tokens of this image: one per patch, plus the CLS token if `has_cls`."""
        return self.grid_size[0] * self.grid_size[1] + has_cls

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        """The layout of this image's tokens at `positions` of batch item `item`."""
        return ImageTokenLayout.for_image(
            item=item, image=image, positions=positions, grid_size=self.grid_size, has_cls=has_cls
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


@dataclass(frozen=True)
class AnyresGrid:
    """How LLaVA-NeXT lays out the tile features of one image (HF's `pack_image_features`).

    The best canvas for the image (`select_best_resolution` over the grid pinpoints) is cut into
    ``tiles = (rows, cols)`` tiles of ``patches_per_tile`` x ``patches_per_tile`` patches. Their
    features, side by side, form the canvas grid of ``rows * patches_per_tile`` by
    ``cols * patches_per_tile`` patches, of which unpadding keeps `kept_rows` x `kept_cols`: the
    rows (or columns) that show the centred image, computed in patch units with HF's
    `unpad_image` arithmetic. The model reads the kept grid row by row, each row followed by one
    newline token. The model (`HookedLlavaNext`) and the inputs (`AnyresGeometry`) both use this
    class, so they cannot disagree.

    Example:
        >>> grid = AnyresGrid.for_image((480, 640), [[336, 672], [672, 336], [672, 672]], 336, 14)
        >>> grid.tiles, grid.kept_rows, grid.kept_cols
        ((2, 2), range(6, 42), range(0, 48))
        >>> grid.unpadded_size, grid.n_tokens
        ((36, 48), 1764)
    """

    tiles: tuple[int, int]
    patches_per_tile: int
    kept_rows: range
    kept_cols: range

    @classmethod
    def for_image(
        cls,
        image_size: tuple[int, int],
        grid_pinpoints: Sequence[Sequence[int]],
        tile_size: int,
        patch_size: int,
    ) -> AnyresGrid:
        """The grid for an image of ``(height, width)`` `image_size`.

        Args:
            image_size: the original image's (height, width).
            grid_pinpoints: candidate canvas sizes ``[height, width]``, multiples of `tile_size`.
            tile_size: side of a tile in pixels (the vision tower's input size).
            patch_size: side of a vision patch in pixels.
        """
        height, width = (int(side) for side in image_size)
        best_height, best_width = select_best_resolution((height, width), list(grid_pinpoints))
        tiles = (best_height // tile_size, best_width // tile_size)
        per_tile = tile_size // patch_size
        rows, cols = tiles[0] * per_tile, tiles[1] * per_tile
        kept_rows, kept_cols = range(rows), range(cols)
        # HF's unpad_image, in patch units and with its float arithmetic (round to 7 digits).
        if width / height > cols / rows:
            padding = (rows - int(round(height * (cols / width), 7))) // 2
            kept_rows = range(padding, rows - padding)
        else:
            padding = (cols - int(round(width * (rows / height), 7))) // 2
            kept_cols = range(padding, cols - padding)
        return cls(tiles, per_tile, kept_rows, kept_cols)

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def unpadded_size(self) -> tuple[int, int]:
        """Rows and columns of the unpadded grid."""
        return len(self.kept_rows), len(self.kept_cols)

    @property
    def n_tokens(self) -> int:
        """Tokens of the tile part: every kept patch plus one newline per kept row."""
        rows, cols = self.unpadded_size
        return rows * (cols + 1)

    def tile_of(self, row: Int[Tensor, "n"], col: Int[Tensor, "n"]) -> Int[Tensor, "n"]:
        """The tile (1, 2, ... row-major) holding unpadded-grid patch (`row`, `col`)."""
        tile_row = (row + self.kept_rows.start) // self.patches_per_tile
        tile_col = (col + self.kept_cols.start) // self.patches_per_tile
        return 1 + tile_row * self.tiles[1] + tile_col


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

    Example:
        >>> geometry = AnyresGeometry.from_image_processor(processor.image_processor, (40, 90), 7)
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
        cls, image_processor: Any, original_size: tuple[int, int], patch_size: int
    ) -> AnyresGeometry:
        """The geometry that a llava-hf LLaVA-NeXT image processor applies.

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
            original_size, image_processor.image_grid_pinpoints, side, patch_size
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
        """Patch ranges that `box` hits: ``"base"`` in the base grid, ``"tiles"`` in the
        unpadded grid (empty where the box only reaches canvas rows or columns that unpadding
        removed). Pixel rule as in `ImageGeometry.patch_ranges`."""
        rows, cols = self.canvas.patch_ranges(box)
        kept_rows = _shifted_intersection(rows, self.grid.kept_rows)
        kept_cols = _shifted_intersection(cols, self.grid.kept_cols)
        if not kept_rows or not kept_cols:
            kept_rows = kept_cols = range(0)
        return {"base": self.base.patch_ranges(box), "tiles": (kept_rows, kept_cols)}


def processor_geometry(
    image_processor: Any, original_size: tuple[int, int], patch_size: int
) -> ImageGeometry | AnyresGeometry:
    """The geometry of `image_processor`: `AnyresGeometry` if it tiles (``image_grid_pinpoints``,
    LLaVA-NeXT), else `ImageGeometry`."""
    if getattr(image_processor, "image_grid_pinpoints", None):
        return AnyresGeometry.from_image_processor(image_processor, original_size, patch_size)
    return ImageGeometry.from_image_processor(image_processor, original_size, patch_size)


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


@dataclass(frozen=True)
class MultimodalInput:
    """A batch of prompts (with or without an image each), ready for any model call.

    Attributes:
        input_ids: ``[batch, pos]`` token ids, image tokens expanded, left-padded.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding.
        pixel_values: ``[n_images, channel, height, width]`` processed images in batch order, or
            None for a text-only batch.
        image_sizes: ``[n_images, 2]`` (height, width) of the original images, or None.
        prompts: the rendered prompt of each item, one placeholder per image (`find` searches it).
        image_token_id: id of the image placeholder token.
        segments: per item, segment name -> sorted positions (see `positions`).
        layout: the image-token layout of the whole batch.
        image_geometry: per image, how the processor maps its pixels (see `patches_in_box`):
            `AnyresGeometry` for LLaVA-NeXT, else `ImageGeometry`.
        image_items: per image, the batch item that holds it.
        token_spans: per item, ``[pos, 2]`` character span (start, end) of each token in
            `prompts[item]` (image tokens: their placeholder's span; specials, padding: (0, 0)).
        template: name of the conversation template used.
        image_sizes_for_model: whether `model_kwargs` passes `image_sizes` (when the processor
            returns them, as LLaVA-NeXT's does; LLaVA-1.5's does not, and its vision tower would
            not accept them).
        processor_fingerprint: `processor_fingerprint` of the processor that made the input; a
            model refuses an input made by a different processor (None: not checked).

    Example:
        >>> inp = MultimodalInput.from_processor(processor, [image, None], ["What is it?", "Hi"])
        >>> inp.positions("question", item=1), inp.patches_in_box((0, 0, 10, 10), image=0)
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "n_images channel height width"] | None
    image_sizes: Int[Tensor, "n_images 2"] | None
    prompts: list[str]
    image_token_id: int
    segments: list[dict[str, Int[Tensor, "n_positions"]]]
    layout: ImageTokenLayout
    image_geometry: list[ImageGeometry | AnyresGeometry]
    image_items: list[int]
    token_spans: list[Int[Tensor, "pos 2"]]
    template: str
    image_sizes_for_model: bool = False
    processor_fingerprint: str | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_images(self) -> int:
        return len(self.image_items)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def positions(self, name: str, item: int = 0) -> Int[Tensor, "n_positions"]:
        """Sorted sequence positions of segment `name` in batch item `item`.

        Args:
            name: one of "system", "image", "user", "question", "last" (see the module doc).
            item: batch item.

        Returns:
            1-D LongTensor of indices into ``input_ids[item]`` (padding included in the count).

        Example:
            >>> inp.positions("last")  # tensor([n_pos - 1]) for a single prompt
        """
        self._check_item(item)
        if name not in SEGMENTS:
            raise ValueError(f"unknown segment {name!r}; valid names: {', '.join(SEGMENTS)}")
        return self.segments[item][name]

    def find(self, substring: str, item: int = 0) -> Int[Tensor, "n_positions"]:
        """Positions of the tokens overlapping the first occurrence of `substring` in the prompt.

        Character offsets from the fast tokenizer decide the overlap (a token "▁door" covers
        " door", so `find("door")` returns it). The placeholder ``<image>`` stands for all of its
        image tokens.

        Example:
            >>> inp.find("door")  # e.g. tensor([612]): the token "▁door"
        """
        self._check_item(item)
        prompt = self.prompts[item]
        start = prompt.find(substring) if substring else -1
        if start < 0:
            raise ValueError(
                f"{substring!r} does not occur in the prompt of item {item}: {prompt!r}"
            )
        spans = self.token_spans[item]
        overlapping = (spans[:, 0] < start + len(substring)) & (spans[:, 1] > start)
        return overlapping.nonzero().flatten().to(self.device)

    def patches_in_box(self, box: Box, image: int = 0) -> Int[Tensor, "n_positions"]:
        """Sequence positions (in the item holding `image`) of the patches the box's pixels land in.

        Args:
            box: ``(x0, y0, x1, y1)`` in pixels of the original image, x1 and y1 exclusive (a
                PIL crop box); ``(0, 0, width, height)`` is the whole image.
            image: index of the image in the batch (batch order, text-only items skipped).

        Returns:
            sorted 1-D LongTensor of positions in ``input_ids[inp.image_items[image]]``; the CLS
            token and LLaVA-NeXT's newline tokens are never included; empty if the box lies
            entirely in a cropped-away margin.

        The mapping follows the processor (pad to square, resize, centre crop); a patch counts if
        any pixel of the box lands in it (precise rule: `ImageGeometry.patch_ranges`). For
        LLaVA-NeXT both views count: the base-grid patches the box lands in (whole image squashed
        to one crop) and the tile patches it lands in (image fitted into the tile canvas), minus
        tile rows or columns that unpadding removed.

        Raises:
            ValueError: unknown image, or an empty box / a box not inside the image.

        Example:
            >>> width, height = image.size
            >>> inp.patches_in_box((0, 0, width // 2, height))  # the left half of the image
        """
        if not 0 <= image < self.n_images:
            raise ValueError(
                f"image {image} does not exist; this input has {self.n_images} image(s)"
            )
        layout = self.layout
        in_grid = {"base": layout.tile == 0, "tiles": layout.tile >= 1}
        in_box = torch.zeros_like(layout.kind, dtype=torch.bool)
        for grid, (rows, cols) in self.image_geometry[image].patch_ranges_per_grid(box).items():
            in_box |= (
                in_grid[grid]
                & (layout.row >= rows.start)
                & (layout.row < rows.stop)
                & (layout.col >= cols.start)
                & (layout.col < cols.stop)
            )
        return layout.position[in_box & (layout.image == image) & (layout.kind == PATCH)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MultimodalInput:
        """A copy with its tensors on `device` (and `pixel_values` cast to `dtype` if given)."""
        pixel_values = self.pixel_values
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=dtype or pixel_values.dtype)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pixel_values,
            image_sizes=None if self.image_sizes is None else self.image_sizes.to(device),
            segments=[{name: pos.to(device) for name, pos in seg.items()} for seg in self.segments],
            layout=self.layout.to(device),
        )

    def model_kwargs(self) -> dict[str, Tensor]:
        """The HF-style keyword tensors: ``model(**inp.model_kwargs())``.

        `input_ids` and `attention_mask`; `pixel_values` when there are images; `image_sizes`
        only for models that take them (`image_sizes_for_model`).
        """
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        if self.image_sizes_for_model and self.image_sizes is not None:
            kwargs["image_sizes"] = self.image_sizes
        return kwargs

    def _check_item(self, item: int) -> None:
        if not 0 <= item < self.batch_size:
            raise ValueError(f"item {item} does not exist; the batch has {self.batch_size} item(s)")

    @classmethod
    def from_processor(
        cls,
        processor: Any,
        images: Any,
        prompts: str | Sequence[str],
        *,
        system: str | None = None,
        template: str | ConversationTemplate = "llava_v1",
        vision_feature_select_strategy: str | None = None,
        patch_size: int | None = None,
    ) -> MultimodalInput:
        """Render the prompts, run the HF processor, and locate segments and image tokens.

        Args:
            processor: the checkpoint's HF processor (`LlavaProcessor`, `LlavaNextProcessor`) with
                a fast tokenizer.
            images: one image (PIL image, local path, uint8 array or float array in [0, 1]; see
                `mmlens.images.as_image`) or None for a single prompt; for a batch, a list with
                one image or None (text-only) per prompt.
            prompts: a question, or a list of questions (a batch, left-padded). With
                ``template="plain"`` the full prompt text, ``<image>`` placeholders included.
            system: replaces the template's system text.
            template: a name registered in `mmlens.templates` or a `ConversationTemplate`
                (`HookedLlavaNext.prepare` passes its checkpoint's template).
            vision_feature_select_strategy: "default" (patch tokens only) or "full" (CLS first;
                LLaVA-1.5 only); default: the processor's.
            patch_size: the vision tower's patch size; default: the processor's.

        Returns:
            a `MultimodalInput` whose ids, mask and pixels are exactly what the processor produced
            for the rendered prompts (``padding=True``, left padding).

        Raises:
            ValueError: images and prompts do not match (a placeholder without an image, an image
                without a placeholder, more images than slots), or the image tokens do not match
                the patch grid.

        Example:
            >>> inp = MultimodalInput.from_processor(processor, [img_a, None], ["Q1?", "Hi!"])
            >>> inp.pixel_values.shape  # llava-1.5: torch.Size([1, 3, 336, 336])
            >>> # llava-v1.6: [n_images, max_crops, 3, 336, 336], base crop then tiles
            >>> inp.positions("image", item=1)  # tensor([], dtype=torch.int64): text-only
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        image_list = list(images) if isinstance(images, (list, tuple)) else [images]
        image_list = [None if image is None else as_image(image) for image in image_list]
        if len(image_list) > len(prompt_list):
            raise ValueError(
                f"{len(image_list)} images for {len(prompt_list)} prompt(s): more images than "
                "prompts (<image> slots); pass one image (or None) per prompt"
            )
        if len(image_list) < len(prompt_list):
            raise ValueError(
                f"{len(image_list)} image(s) for {len(prompt_list)} prompts: fewer images than "
                "prompts; pass one image per prompt, None for a text-only prompt, or [image] * n "
                "to ask several questions about one image"
            )
        strategy = vision_feature_select_strategy or getattr(
            processor, "vision_feature_select_strategy", None
        )
        patch_size = patch_size or getattr(processor, "patch_size", None)
        if strategy not in ("default", "full") or not patch_size:
            raise ValueError(
                f"need vision_feature_select_strategy ('default' or 'full', got {strategy!r}) and "
                f"patch_size (got {patch_size!r}); pass them (from the model config) or use a "
                "processor that has them"
            )
        image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        image_token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
        rendered = [
            render(
                template,
                prompt,
                n_images=int(image is not None),
                system=system,
                image_token=image_token,
            )
            for prompt, image in zip(prompt_list, image_list, strict=True)
        ]
        given_images = [image for image in image_list if image is not None]
        encoded = processor(
            images=given_images or None,
            text=[prompt.text for prompt in rendered],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        pixel_values = encoded.get("pixel_values")

        image_items = [item for item, image in enumerate(image_list) if image is not None]
        original_sizes = [_image_size(image) for image in given_images]
        geometry = [
            processor_geometry(processor.image_processor, size, patch_size)
            for size in original_sizes
        ]
        for image_index, image_geometry in enumerate(geometry):
            if image_geometry.processed_size != tuple(pixel_values.shape[-2:]):
                raise ValueError(
                    f"image {image_index}: the processor produced {tuple(pixel_values.shape[-2:])} "
                    f"pixels but its settings predict {image_geometry.processed_size}"
                )

        has_cls = strategy == "full"
        is_image = (input_ids == image_token_id) & attention_mask.bool()
        item_images = [
            [index for index, owner in enumerate(image_items) if owner == item]
            for item in range(len(rendered))
        ]
        image_token_counts = [
            [geometry[index].n_image_tokens(has_cls) for index in indices]
            for indices in item_images
        ]
        for item, counts in enumerate(image_token_counts):
            if int(is_image[item].sum()) != sum(counts):
                raise ValueError(
                    f"batch item {item} has {int(is_image[item].sum())} image tokens, but its "
                    f"{len(counts)} image(s) need {sum(counts)} with vision_feature_select_strategy="
                    f"{strategy!r}; check patch_size, the strategy and the processor's "
                    "num_additional_image_tokens against the model config"
                )
        token_spans = _token_spans(
            processor.tokenizer, rendered, input_ids, attention_mask, image_token_counts
        )

        segments, layouts = [], []
        for item, prompt in enumerate(rendered):
            image_positions = is_image[item].nonzero().flatten()
            layouts += _item_layouts(item, item_images[item], image_positions, geometry, has_cls)
            segments.append(
                _segments(prompt, attention_mask[item], is_image[item], token_spans[item])
            )

        image_sizes = torch.tensor(original_sizes, dtype=torch.long) if original_sizes else None
        image_sizes_for_model = "image_sizes" in encoded  # LLaVA-NeXT's processor returns them
        if image_sizes_for_model and not torch.equal(encoded["image_sizes"].cpu(), image_sizes):
            raise ValueError(
                f"the processor reports image sizes {encoded['image_sizes'].tolist()}, but the "
                f"images are {image_sizes.tolist()} (height, width)"
            )
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            prompts=[prompt.text for prompt in rendered],
            image_token_id=image_token_id,
            segments=segments,
            layout=ImageTokenLayout.concatenate(layouts),
            image_geometry=geometry,
            image_items=image_items,
            token_spans=token_spans,
            template=template if isinstance(template, str) else template.name,
            image_sizes_for_model=image_sizes_for_model,
            processor_fingerprint=processor_fingerprint(processor),
        )


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def processor_fingerprint(processor: Any) -> str:
    """A short hash of what decides a `MultimodalInput`: the tokenizer's vocabulary (added
    tokens included), the image token and the image processor's settings.

    Two processors loaded from the same checkpoint give the same fingerprint. Computed once
    per processor object.

    Example:
        >>> processor_fingerprint(model.processor)  # doctest: +SKIP
        '3f1c9a0d5e2b7c41'
    """
    try:
        return _FINGERPRINTS[processor]
    except (KeyError, TypeError):
        pass
    tokenizer = processor.tokenizer
    parts = {
        "tokenizer": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "image_token": getattr(processor, "image_token", None),
        "image_processor": processor.image_processor.to_dict(),
        "patch_size": getattr(processor, "patch_size", None),
        "strategy": getattr(processor, "vision_feature_select_strategy", None),
    }
    encoded = json.dumps(parts, sort_keys=True, default=str).encode()
    fingerprint = hashlib.sha256(encoded).hexdigest()[:16]
    try:
        _FINGERPRINTS[processor] = fingerprint
    except TypeError:  # an object that cannot be weakly referenced: recomputed each time
        pass
    return fingerprint


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


def _token_spans(
    tokenizer: Any,
    rendered: list[RenderedPrompt],
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    image_token_counts: list[list[int]],
) -> list[Int[Tensor, "pos 2"]]:
    """Character span of every token in its rendered prompt, from the fast tokenizer's offsets.

    The processor expanded each placeholder into one image token per image feature
    (`image_token_counts[item]`, one count per placeholder: LLaVA-NeXT's differ by image size);
    the same expanded text is tokenized again with offsets (and must give the same ids), then
    offsets are mapped back to the rendered prompt: an image token gets its placeholder's span.
    """
    expanded_texts, placeholder_blocks = [], []
    for prompt, counts in zip(rendered, image_token_counts, strict=True):
        text, blocks, cursor = "", [], 0
        for (start, end), n_image_tokens in zip(prompt.image_spans, counts, strict=True):
            text += prompt.text[cursor:start]
            expanded_start = len(text)
            text += prompt.text[start:end] * n_image_tokens
            blocks.append((expanded_start, len(text), start, end))
            cursor = end
        expanded_texts.append(text + prompt.text[cursor:])
        placeholder_blocks.append(blocks)

    encoded = tokenizer(
        expanded_texts,
        padding=True,
        padding_side="left",
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    if not (
        torch.equal(encoded["input_ids"], input_ids)
        and torch.equal(encoded["attention_mask"], attention_mask)
    ):
        raise RuntimeError(
            "the tokenizer's ids for the expanded prompts differ from the processor's; "
            "segments cannot be located (is the processor's tokenizer a fast tokenizer?)"
        )
    spans = []
    for offsets, blocks in zip(encoded["offset_mapping"], placeholder_blocks, strict=True):
        offsets = offsets.clone()
        for token, (start, end) in enumerate(offsets.tolist()):
            if end <= start:
                continue
            for expanded_start, expanded_end, rendered_start, rendered_end in reversed(blocks):
                if start >= expanded_end:  # after this placeholder: undo the expansion
                    shift = expanded_end - rendered_end  # growth of all blocks up to here
                    offsets[token] = torch.tensor([start - shift, end - shift])
                    break
                if start >= expanded_start:  # an image token of this placeholder
                    offsets[token] = torch.tensor([rendered_start, rendered_end])
                    break
        spans.append(offsets)
    return spans


def _segments(
    prompt: RenderedPrompt,
    attention_mask: Int[Tensor, "pos"],
    is_image: Bool[Tensor, "pos"],
    spans: Int[Tensor, "pos 2"],
) -> dict[str, Int[Tensor, "n_positions"]]:
    """Segment positions of one batch item (see the module doc)."""
    real = attention_mask.bool()
    real_positions = real.nonzero().flatten()
    last = int(real_positions[-1])
    image = is_image.nonzero().flatten()
    if len(image):
        first_user, after_image = int(image[0]), int(image[-1]) + 1
    else:
        reaches_user = real & (spans[:, 1] > spans[:, 0]) & (spans[:, 1] > prompt.user_start)
        content = reaches_user.nonzero().flatten()
        first_user = after_image = int(content[0]) if len(content) else last + 1
    question_start, question_end = prompt.question_span
    question = real & ~is_image & (spans[:, 0] < question_end) & (spans[:, 1] > question_start)
    return {
        "system": real_positions[real_positions < first_user],
        "image": image,
        "user": torch.arange(after_image, last + 1),
        "question": question.nonzero().flatten(),
        "last": torch.tensor([last]),
    }


def _item_layouts(
    item: int,
    item_images: list[int],
    image_positions: Int[Tensor, "n_image_tokens"],
    geometry: list[ImageGeometry | AnyresGeometry],
    has_cls: bool,
) -> list[ImageTokenLayout]:
    """Layouts of the images of one batch item, whose tokens follow each other in order."""
    layouts, cursor = [], 0
    for index in item_images:
        n_tokens = geometry[index].n_image_tokens(has_cls)
        positions = image_positions[cursor : cursor + n_tokens]
        layouts.append(
            geometry[index].token_layout(
                item=item, image=index, positions=positions, has_cls=has_cls
            )
        )
        cursor += n_tokens
    return layouts
