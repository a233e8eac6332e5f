"""The image-token layout: what each image token of a batch shows (image, tile, patch row and
column, or a newline), in sequence order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

TOKEN_KINDS = ("patch", "cls", "newline", "query")
"""Names of the `ImageTokenLayout.kind` codes: ``TOKEN_KINDS[code]`` ("query": a learned query
token that reads every patch, as a resampler's, and shows no one patch)."""
PATCH, CLS, NEWLINE, QUERY = range(len(TOKEN_KINDS))

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ImageTokenLayout:
    """What each image token of a batch shows: one entry per image token, in sequence order.

    All fields are LongTensors of shape ``[n_image_tokens]``; `kind` holds `PATCH`, `CLS` or
    `NEWLINE` (names in `TOKEN_KINDS`).

    - `tile` is 0 for the base image (a single-crop image's only one); for a tiled image, 1, 2,
      ... is the tile a patch came from (row-major over the tile grid, the processor's crop
      order) and -1 marks a newline token.
    - `row` and `col`: for the base image, the patch grid (CLS: -1, -1). For tile patches, the
      family's high-resolution token grid (for instance the unpadded grid of all tiles side by
      side, row 0 being the first row the model kept; where the family downsamples it, the
      cells of the downsampled grid, whose `tile` is the one under the cell's centre). A newline
      token has the `row` it ends and `col` -1. A query token (`QUERY`) has `row` -1 and its
      query index as `col`.

    The entries of one image are in the model's order, as the family's geometry lays them out
    (`token_layout`, docs/architecture.md). The layout of the whole batch lists the image
    tokens in the order `hook_image_embeds` holds them.

    Examples:
        >>> layout = inp.layout
        >>> layout.position[(layout.image == 0) & (layout.tile == 0) & (layout.row == 0)]  # top row
        tensor([32, 33, 34, 35, 36, 37, 38, 39])
        >>> layout = next_model.prepare(image, "What is it?").layout
        >>> len(layout.position[layout.kind == NEWLINE])  # a tiled image's newline tokens
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

        Tile 0 is the base image's full patch grid. A tile (1, 2, ...) of a tiled image gives
        the part of the high-resolution token grid it covers, as a rectangle.

        Examples:
            >>> inp.layout.patch_grid(0).shape  # (24, 24) for llava-1.5 at 336 px
            torch.Size([8, 8])
        """
        selected = (self.image == image) & (self.tile == tile) & (self.kind == PATCH)
        return self._grid(selected, f"image {image}, tile {tile}")

    def highres_grid(self, image: int = 0) -> Int[Tensor, "rows cols"]:
        """Sequence positions of all tile patches of a tiled `image`, as the token grid.

        The grid the model reads row by row (each row then followed by a newline token); newline
        tokens are not in it. ``grid[r, c]`` is the token with ``row == r`` and ``col == c``.

        Examples:
            >>> next_model.prepare(image, "What is it?").layout.highres_grid(0).shape
            torch.Size([8, 8])

            (36, 48) for a 640 x 480 image on 336-pixel tiles of 14-pixel patches.
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
                " (only tiled images have tiles 1, 2, ...)"
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
        """The layout of one single-crop image: [CLS] then the patches in row-major order (then,
        with `newline`, one newline token, tile -1, ending the last row)."""
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


def _item_layouts(
    item: int,
    item_images: list[int],
    image_positions: Int[Tensor, "n_image_tokens"],
    geometry: list[Any],
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
