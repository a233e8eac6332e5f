"""The image-token layout: what each image token of a batch shows (image, tile, patch row and
column, or a newline), in sequence order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool, Int
from torch import Tensor

if TYPE_CHECKING:
    from mmlens.inputs.geometry import AnyresGeometry, AnyresGrid, ImageGeometry

TOKEN_KINDS = ("patch", "cls", "newline", "query")
"""Names of the `ImageTokenLayout.kind` codes: ``TOKEN_KINDS[code]`` ("query": an InstructBLIP
Q-Former query, which shows no one patch)."""
PATCH, CLS, NEWLINE, QUERY = range(len(TOKEN_KINDS))

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
      unpadding removed, so row 0 is the first row the model kept. Where LLaVA-OneVision
      downsamples that grid, the cells of the downsampled grid (`AnyresGrid.token_grid`; their
      `tile` is the one under the cell's centre). A newline token has the `row` it ends and
      `col` -1.

    The entries of one image are in the model's order: base grid row-major, then each kept row of
    the tile grid followed by its newline. The layout of the whole batch lists the image tokens
    in the order `hook_image_embeds` holds them.

    Examples:
        >>> layout = inp.layout
        >>> layout.position[(layout.image == 0) & (layout.tile == 0) & (layout.row == 0)]  # top row
        tensor([32, 33, 34, 35, 36, 37, 38, 39])
        >>> layout = next_model.prepare(image, "What is it?").layout
        >>> len(layout.position[layout.kind == NEWLINE])  # LLaVA-NeXT's newline tokens
        8
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

        Examples:
            >>> inp.layout.patch_grid(0).shape  # (24, 24) for llava-1.5 at 336 px
            torch.Size([8, 8])
        """
        selected = (self.image == image) & (self.tile == tile) & (self.kind == PATCH)
        return self._grid(selected, f"image {image}, tile {tile}")

    def highres_grid(self, image: int = 0) -> Int[Tensor, "rows cols"]:
        """Sequence positions of all tile patches of a LLaVA-NeXT `image`, as the unpadded grid.

        The grid the model reads row by row (each row then followed by a newline token); newline
        tokens are not in it. ``grid[r, c]`` is the token with ``row == r`` and ``col == c``.

        Examples:
            >>> next_model.prepare(image, "What is it?").layout.highres_grid(0).shape
            torch.Size([8, 8])

            (36, 48) for a 640 x 480 image with llava-v1.6.
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
        newline: bool = False,
    ) -> ImageTokenLayout:
        """The layout of one LLaVA-1.5 image: [CLS] then the patches in row-major order (then,
        for a LLaVA-OneVision image of a several-image prompt, one newline token, tile -1,
        ending the last row)."""
        rows, cols = grid_size
        row = torch.arange(rows).repeat_interleave(cols)
        col = torch.arange(cols).repeat(rows)
        kind = torch.full((rows * cols,), PATCH)
        tile = torch.zeros(rows * cols, dtype=torch.long)
        if has_cls:
            row, col = torch.cat([torch.tensor([-1]), row]), torch.cat([torch.tensor([-1]), col])
            kind = torch.cat([torch.tensor([CLS]), kind])
            tile = torch.cat([torch.tensor([0]), tile])
        if newline:
            row, col = (
                torch.cat([row, torch.tensor([rows - 1])]),
                torch.cat([col, torch.tensor([-1])]),
            )
            kind = torch.cat([kind, torch.tensor([NEWLINE])])
            tile = torch.cat([tile, torch.tensor([-1])])
        n_tokens = kind.numel()
        return cls(
            item=torch.full((n_tokens,), item),
            position=positions.to(torch.long),
            image=torch.full((n_tokens,), image),
            tile=tile,
            row=row,
            col=col,
            kind=kind,
        )

    @classmethod
    def for_queries(
        cls, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"]
    ) -> ImageTokenLayout:
        """The layout of one InstructBLIP image: its Q-Former queries in order (`col` is the
        query's index, `row` -1, tile 0, kind `QUERY`)."""
        n_tokens = positions.numel()
        return cls(
            item=torch.full((n_tokens,), item),
            position=positions.to(torch.long),
            image=torch.full((n_tokens,), image),
            tile=torch.zeros(n_tokens, dtype=torch.long),
            row=torch.full((n_tokens,), -1),
            col=torch.arange(n_tokens),
            kind=torch.full((n_tokens,), QUERY),
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
        """The layout of one LLaVA-NeXT image: the base grid row-major, then each row of the
        tile token grid (the unpadded grid; OneVision: its downsampling) followed by a newline
        token (HF's `pack_image_features`)."""
        n_base = base_grid_size[0] * base_grid_size[1]
        base = cls.for_image(
            item=item,
            image=image,
            positions=positions[:n_base],
            grid_size=base_grid_size,
            has_cls=False,
        )
        rows, cols = grid.token_grid_size
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
