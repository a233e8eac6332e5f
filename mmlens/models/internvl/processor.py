"""InternVL's inputs: dynamic tiling, the thumbnail, and ``<img><IMG_CONTEXT>...</img>``.

transformers' `InternVLProcessor` is built with a video processor, and video processors need
torchvision, which mmlens does not depend on. `InternVLInputProcessor` does its image half:
HF's `GotOcr2ImageProcessorPil` cuts each image into tiles (``crop_to_patches``: the grid of
``cols x rows`` tiles between ``min_patches`` and ``max_patches`` whose aspect ratio is closest
to the image's, the image squashed onto it) and adds a thumbnail (the whole image squashed to
one tile) when there is more than one tile; each ``<IMG_CONTEXT>`` placeholder of a prompt
becomes ``<img>`` + ``image_seq_length`` ``<IMG_CONTEXT>`` per crop + ``</img>``, as
`InternVLProcessor.replace_image_token` writes it.

The geometry (`InternVLGeometry`): each crop is its own grid of tokens, one per 2 x 2 patches
after the pixel shuffle (16 x 16 tokens on a 448 px crop of 14 px patches). The tiles side by
side are the image's high-resolution token grid (`InternVLTileGrid`, layout tiles 1, 2, ...,
row-major), the thumbnail is its base grid (layout tile 0), although the model reads the
thumbnail last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import AutoTokenizer, BatchFeature, GotOcr2ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from mmlens.inputs.adapters import own_processor_adapter, register_adapter
from mmlens.inputs.geometry import size_field
from mmlens.inputs.images import processor_arguments
from mmlens.inputs.layout import PATCH, Box, ImageTokenLayout
from mmlens.inputs.templates import RenderedPrompt
from mmlens.inputs.tokenization import hf_token_spans
from mmlens.models.qwen2_vl.processor import MergedGridGeometry, merged_grid_geometry

IMAGE_TAGS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
}
"""The image tags of InternVL's tokenizers (HF: the tokenizer's ``extra_special_tokens``)."""


@dataclass(frozen=True)
class InternVLTileGrid:
    """An image's tiles side by side: ``tiles = (rows, cols)`` tiles of `tile_tokens` x
    `tile_tokens` tokens, the token grid (`mmlens.models.family.TileGrid`). The processor gives
    the tiles row-major, before the thumbnail (`first_tile_crop` 0).

    Examples:
        >>> grid = InternVLTileGrid((2, 3), 4)
        >>> grid.n_tiles, grid.token_grid_size
        (6, (8, 12))
        >>> grid.pack(torch.zeros(6, 16, 5)).shape     # one value per token
        torch.Size([8, 12, 5])
        >>> grid.pack(torch.zeros(6, 64, 5)).shape     # vision patches: 2 x 2 per token
        torch.Size([16, 24, 5])
    """

    tiles: tuple[int, int]
    tile_tokens: int
    first_tile_crop: ClassVar[int] = 0

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def token_grid_size(self) -> tuple[int, int]:
        return self.tiles[0] * self.tile_tokens, self.tiles[1] * self.tile_tokens

    def pack(self, tile_features: Float[Tensor, "tile patch d"]) -> Float[Tensor, "rows cols d"]:
        """The tiles' features (crop order, each a row-major square grid: tokens, or the vision
        tower's patches, 2 x 2 per token) side by side as one grid."""
        side = math.isqrt(tile_features.shape[1])
        if side * side != tile_features.shape[1] or tile_features.shape[0] != self.n_tiles:
            raise ValueError(
                f"features of shape {tuple(tile_features.shape)}: expected {self.n_tiles} tiles "
                "of a square grid each"
            )
        return einops.rearrange(
            tile_features,
            "(tile_row tile_col) (row col) d -> (tile_row row) (tile_col col) d",
            tile_row=self.tiles[0],
            row=side,
        )

    def describe(self) -> str:
        return f"{self.tiles[0]}x{self.tiles[1]} tile grid"


@dataclass(frozen=True)
class InternVLGeometry:
    """Where one image's pixels go in InternVL's tiles and thumbnail.

    Attributes:
        thumbnail: the whole image squashed to one crop (the base grid, layout tile 0).
        canvas: the image squashed to the tiles' canvas (the high-resolution grid, tiles 1..n).
        grid: how the tiles lie on the canvas.

    Examples:
        >>> from mmlens.testing import make_test_image
        >>> geometry = internvl.prepare(make_test_image(90, 40), "Why?").image_geometry[0]
        >>> geometry.grid.tiles, geometry.n_crops, geometry.n_image_tokens(has_cls=False)
        ((1, 2), 3, 48)
    """

    thumbnail: MergedGridGeometry
    canvas: MergedGridGeometry
    grid: InternVLTileGrid

    @property
    def original_size(self) -> tuple[int, int]:
        return self.thumbnail.original_size

    @property
    def processed_size(self) -> tuple[int, int]:
        """Each crop's size (tiles and thumbnail alike)."""
        return self.thumbnail.processed_size

    @property
    def n_crops(self) -> int:
        """The tiles, then the thumbnail."""
        return self.grid.n_tiles + 1

    @property
    def vision_view(self) -> Any:
        """The thumbnail on the vision tower's patches: the crop that shows the whole image."""
        return self.thumbnail.vision_view

    @property
    def tile_grid(self) -> InternVLTileGrid:
        return self.grid

    def n_image_tokens(self, has_cls: bool) -> int:
        """Every crop's tokens (the class token is never kept)."""
        if has_cls:
            raise ValueError("InternVL drops the class token ('default' strategy); use 'default'")
        rows, cols = self.thumbnail.grid_size
        return self.n_crops * rows * cols

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        """Each tile's tokens row-major (tile ``t + 1``, `row` / `col` in the canvas' token
        grid), tile after tile, then the thumbnail's (tile 0, its own grid)."""
        n_tiles, side = self.grid.n_tiles, self.grid.tile_tokens
        tile = torch.arange(n_tiles).repeat_interleave(side * side)
        within = torch.arange(side * side).repeat(n_tiles)
        row = (tile // self.grid.tiles[1]) * side + within // side
        col = (tile % self.grid.tiles[1]) * side + within % side
        n_tile_tokens = row.numel()
        tiles = ImageTokenLayout(
            item=torch.full((n_tile_tokens,), item),
            position=positions[:n_tile_tokens].to(torch.long),
            image=torch.full((n_tile_tokens,), image),
            tile=tile + 1,
            row=row,
            col=col,
            kind=torch.full((n_tile_tokens,), PATCH),
        )
        thumbnail = self.thumbnail.token_layout(
            item=item, image=image, positions=positions[n_tile_tokens:], has_cls=has_cls
        )
        return ImageTokenLayout.concatenate([tiles, thumbnail])

    def patch_ranges_per_grid(self, box: Box) -> dict[str, tuple[range, range]]:
        """The thumbnail's tokens (``"base"``) and the canvas' tokens (``"tiles"``, on every
        tile the box overlaps) that the box's pixels land in (`ImageGeometry.patch_ranges`)."""
        return {"base": self.thumbnail.patch_ranges(box), "tiles": self.canvas.patch_ranges(box)}


@dataclass(frozen=True)
class ColumnMajorTokens:
    """An InternVL geometry whose crops give their tokens column by column (the original
    ``ps_version: v1`` pixel shuffle, InternVL-Chat-V1-5's): every member is `geometry`'s, but
    the k-th token of a crop of `side` x `side` tokens shows cell (k % side, k // side).

    Examples:
        >>> single = internvl.processor.image_geometry((40, 40), tiled=True)   # 4 x 4 tokens
        >>> transposed = ColumnMajorTokens(single, 4)
        >>> layout = transposed.token_layout(item=0, image=0, positions=torch.arange(16), has_cls=False)
        >>> layout.col[:3].tolist(), layout.position[:3].tolist()   # row 0: tokens 0, 4, 8
        ([0, 1, 2], [0, 4, 8])
    """

    geometry: Any
    side: int

    def __getattr__(self, name: str) -> Any:
        if name == "geometry":  # not set yet (a copy being built): no delegation
            raise AttributeError(name)
        return getattr(self.geometry, name)

    def token_layout(
        self, *, item: int, image: int, positions: Int[Tensor, "n_image_tokens"], has_cls: bool
    ) -> ImageTokenLayout:
        """`geometry`'s layout of row-major crops, given each cell the position of the token
        that shows it: cell (r, c) of a crop is its token ``c * side + r``."""
        cells = self.side * self.side
        per_crop = torch.arange(cells).reshape(self.side, self.side).T.flatten()
        crops = torch.arange(positions.numel() // cells)
        order = (crops[:, None] * cells + per_crop[None]).flatten()
        return self.geometry.token_layout(
            item=item, image=image, positions=positions[order], has_cls=has_cls
        )


class InternVLInputProcessor:
    """The image side of `InternVLProcessor`: ``processor(images=..., text=...)`` returns
    ``input_ids``, ``attention_mask``, ``pixel_values`` (``[n_crops, 3, side, side]``: each
    image's tiles then its thumbnail, images in prompt order) and ``num_patches`` (crops per
    image), as HF's does for images.

    Args:
        image_processor: the checkpoint's `GotOcr2ImageProcessorPil`.
        tokenizer: its fast tokenizer (with the image tags).
        image_seq_length: tokens per crop (256 for 448 px crops).
        crop_to_patches: tile images (`InternVLProcessor` does by default).
        tags: the image tags (`IMAGE_TAGS`).

    Examples:
        >>> from mmlens.testing import make_test_image
        >>> processor = internvl.processor
        >>> encoded = processor(images=[make_test_image(90, 40)], text=["<IMG_CONTEXT>\\nWhy?"])
        >>> encoded["pixel_values"].shape, encoded["num_patches"].tolist()   # 2 tiles + thumbnail
        (torch.Size([3, 3, 56, 56]), [3])
    """

    num_additional_image_tokens = 0
    vision_feature_select_strategy = "default"

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        *,
        image_seq_length: int = 256,
        crop_to_patches: bool = True,
        column_major: bool = False,
        tags: dict[str, str] = IMAGE_TAGS,
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_length = image_seq_length
        self.crop_to_patches = crop_to_patches
        self.column_major = column_major
        """Each crop's tokens column by column (InternVL-Chat-V1-5's ``ps_version: v1``)."""
        self.start_image_token = tags["start_image_token"]
        self.end_image_token = tags["end_image_token"]
        self.image_token = tags["context_image_token"]
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        side = self.tile_size
        self.tile_tokens = math.isqrt(image_seq_length)
        if self.tile_tokens**2 != image_seq_length or side % self.tile_tokens:
            raise ValueError(
                f"image_seq_length={image_seq_length} for {side} px crops: expected a square "
                "token grid dividing the crop (256 for 448 px)"
            )
        self.patch_size = side // self.tile_tokens  # one token's side in pixels

    @property
    def tile_size(self) -> int:
        size = self.image_processor.size
        height, width = size_field(size, "height"), size_field(size, "width")
        if not height or height != width:
            raise ValueError(f"InternVL crops of size {size}: one square side is modelled")
        return height

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> InternVLInputProcessor:
        """Read an InternVL ``-hf`` folder: ``preprocessor_config.json``, the tokenizer (its
        ``extra_special_tokens`` name the image tags) and ``processor_config.json``'s
        ``image_seq_length``."""
        folder = Path(folder)
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no preprocessor_config.json: an InternVL -hf checkpoint ships its "
                "image processor's settings there"
            )
        settings_path = folder / "processor_config.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        tags = {
            name: getattr(tokenizer, name, None) or default for name, default in IMAGE_TAGS.items()
        }
        return cls(
            GotOcr2ImageProcessorPil.from_pretrained(folder),
            tokenizer,
            image_seq_length=settings.get("image_seq_length", 256),
            tags=tags,
        )

    def tiles(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of the tiles of an image of ``(height, width)`` `original_size`
        (HF's `get_optimal_tiled_canvas`); (1, 1): one crop, no thumbnail."""
        processor = self.image_processor
        if not self.crop_to_patches or processor.max_patches <= 1:
            return 1, 1
        side = self.tile_size
        cols, rows = get_optimal_tiled_canvas(
            tuple(original_size), (side, side), processor.min_patches, processor.max_patches
        )
        return rows, cols

    def image_geometry(
        self, original_size: tuple[int, int], tiled: bool
    ) -> InternVLGeometry | MergedGridGeometry:
        """The geometry of an image of ``(height, width)`` `original_size`: tiles and
        thumbnail, or one crop (the image squashed) where it gets one tile (`tiled`, which
        `MultimodalInput` passes to every mmlens processor, does not apply: InternVL tiles
        every image)."""
        side, cell = self.tile_size, self.patch_size
        merge = cell // self.vision_patch_size
        thumbnail = merged_grid_geometry(original_size, (side, side), cell, merge)
        rows, cols = self.tiles(original_size)
        if rows * cols == 1:
            geometry = thumbnail
        else:
            canvas = merged_grid_geometry(original_size, (rows * side, cols * side), cell, merge)
            grid = InternVLTileGrid((rows, cols), self.tile_tokens)
            geometry = InternVLGeometry(thumbnail, canvas, grid)
        return ColumnMajorTokens(geometry, self.tile_tokens) if self.column_major else geometry

    @property
    def vision_patch_size(self) -> int:
        """The vision tower's patch side: a token's side over the pixel shuffle's 2 (InternVL's
        ``downsample_ratio`` 0.5)."""
        return self.patch_size // 2

    def expand(self, placeholder: str, n_image_tokens: int) -> str:
        """How a placeholder is written out for an image of `n_image_tokens` tokens."""
        return f"{self.start_image_token}{self.image_token * n_image_tokens}{self.end_image_token}"

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Crops of `images` (in prompt order) and ids of `text` with each placeholder expanded.

        Raises:
            ValueError: the number of images differs from the number of placeholders.
        """
        image_list, texts = processor_arguments(images, text)
        n_placeholders = sum(prompt.count(self.image_token) for prompt in texts)
        if n_placeholders != len(image_list):
            raise ValueError(
                f"{len(image_list)} image(s) for {n_placeholders} {self.image_token!r} "
                "placeholder(s): give one image per placeholder, in prompt order"
            )
        data: dict[str, Any] = {}
        if image_list:
            data = dict(
                self.image_processor(
                    image_list, crop_to_patches=self.crop_to_patches, return_tensors=return_tensors
                )
            )
            counts = iter(data["num_patches"].tolist())
            texts = [
                "".join(
                    part
                    if index == 0
                    else self.expand(self.image_token, self.image_seq_length * next(counts)) + part
                    for index, part in enumerate(prompt.split(self.image_token))
                )
                for prompt in texts
            ]
        encoded = self.tokenizer(
            texts, padding=padding, padding_side=padding_side, return_tensors=return_tensors
        )
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)

    def token_spans(
        self, texts: Sequence[str], input_ids: Tensor, attention_mask: Tensor
    ) -> list[Tensor]:
        """Per prompt, the character span in `texts[item]` of every position: every token of an
        image's ``<img>...</img>`` gets its placeholder's span; padding (0, 0)."""
        rendered, counts = [], []
        for text, ids, mask in zip(texts, input_ids, attention_mask, strict=True):
            spans, found = [], text.find(self.image_token)
            while found >= 0:
                spans.append((found, found + len(self.image_token)))
                found = text.find(self.image_token, found + len(self.image_token))
            rendered.append(RenderedPrompt(text, (0, 0), 0, tuple(spans)))
            is_image = (ids[mask.bool()] == self.image_token_id).long()
            starts = (torch.diff(is_image, prepend=is_image.new_zeros(1)) == 1).nonzero().flatten()
            ends = (torch.diff(is_image, append=is_image.new_zeros(1)) == -1).nonzero().flatten()
            counts.append((ends - starts + 1).tolist())
        return hf_token_spans(
            self.tokenizer, rendered, input_ids, attention_mask, counts, expand=self.expand
        )


register_adapter(
    own_processor_adapter(
        InternVLInputProcessor,
        "InternVL",
        places_image_tokens=True,
        # pixel_values: each image's crops as rows (tiles, thumbnail), images in turn
        pixel_rows=lambda processor, encoded: encoded["num_patches"].tolist(),
        fingerprint_parts=lambda processor: {
            "image_seq_length": processor.image_seq_length,
            "crop_to_patches": processor.crop_to_patches,
            "column_major": processor.column_major,
        },
    )
)
