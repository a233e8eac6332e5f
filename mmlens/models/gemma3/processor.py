"""Gemma 3's inputs for images: the checkpoint's image processor and tokenizer, each
``<start_of_image>`` placeholder expanded as HF's `Gemma3Processor` expands it.

HF's processor writes ``"\\n\\n<start_of_image>" + "<image_soft_token>" * 256 +
"<end_of_image>\\n\\n"`` for each placeholder; its `image_token_id` is the placeholder's
(``<start_of_image>``), not the id of the tokens the image features fill. `Gemma3InputProcessor`
does the same expansion with HF's `Gemma3ImageProcessorPil` (no torchvision), gives the image
tokens' id (``<image_soft_token>``) as `image_token_id`, and each token its character span.
Each image is squashed to the tower's square size (no padding, no crop), so its geometry is a
`MergedGridGeometry` whose cell is a pooled block of `pool` x `pool` tower patches.

Pan-and-scan (``do_pan_and_scan``, off in the released processors; `with_pan_and_scan` turns it
on): an image whose aspect ratio passes ``pan_and_scan_min_ratio_to_activate`` is also cut
into 2 .. ``pan_and_scan_max_num_crops`` crops side by side along its long axis (HF's
`pan_and_scan`), each squashed to the square like the image; the prompt then reads "Here is
the original image {image} and here are some crops to help you see better {crop} {crop}",
each with its own 256 tokens (`PanAndScanGeometry`: tile 0 the whole image, tiles 1.. the
crops, their cells side by side in `row` / `col`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from transformers import AutoTokenizer, BatchFeature, Gemma3ImageProcessorPil

from mmlens.inputs.adapters import own_processor_adapter, register_adapter
from mmlens.inputs.images import processor_arguments
from mmlens.inputs.layout import PATCH, Box, ImageTokenLayout
from mmlens.models.qwen2_vl.processor import MergedGridGeometry, merged_grid_geometry

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
PAN_AND_SCAN_DEFAULTS = {
    "pan_and_scan_min_crop_size": 256,
    "pan_and_scan_max_num_crops": 4,
    "pan_and_scan_min_ratio_to_activate": 1.2,
}
"""HF's `Gemma3Processor` defaults for the settings an image processor leaves unset."""


def pan_and_scan_boxes(
    original_size: tuple[int, int], min_crop_size: int, max_num_crops: int, min_ratio: float
) -> list[tuple[int, int, int, int]]:
    """The crops HF's `Gemma3ImageProcessor.pan_and_scan` cuts from an image of ``(height,
    width)`` `original_size`, as ``(x0, y0, x1, y1)`` boxes (x1, y1 exclusive, clipped to the
    image as array slicing clips them); none where the image is too square or too small.

    >>> pan_and_scan_boxes((300, 800), 256, 4, 1.2)
    [(0, 0, 267, 300), (267, 0, 534, 300), (534, 0, 800, 300)]
    >>> pan_and_scan_boxes((300, 320), 256, 4, 1.2)
    []
    """
    height, width = original_size
    if width >= height:
        if width / height < min_ratio:
            return []
        n_w = int(math.floor(width / height + 0.5))
        n_w = min(max_num_crops, max(2, min(int(math.floor(width / min_crop_size)), n_w)))
        n_h = 1
    else:
        if height / width < min_ratio:
            return []
        n_h = int(math.floor(height / width + 0.5))
        n_h = min(max_num_crops, max(2, min(int(math.floor(height / min_crop_size)), n_h)))
        n_w = 1
    crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [
        (x, y, min(x + crop_w, width), min(y + crop_h, height))
        for y in range(0, crop_h * n_h, crop_h)
        for x in range(0, crop_w * n_w, crop_w)
    ]


@dataclass(frozen=True)
class PanAndScanGeometry:
    """An image with pan-and-scan crops: the whole image (`whole`, tile 0), then each
    crop (tiles 1..), every one squashed to the tower's square and read as its own grid of
    pooled cells. In the layout a crop's cells lie side by side with the other crops' (`col`
    offset by the crops before it in a row of crops, `row` in a column of them), so that
    `patches_in_box` finds a box in every crop it overlaps. LLaVA-CAM and figures use the
    whole image's view (`tile_grid` None: the crops are not packed into one canvas)."""

    original_size: tuple[int, int]
    whole: MergedGridGeometry
    """The whole image's pooled-cell grid (tile 0)."""
    crops: tuple[MergedGridGeometry, ...]
    boxes: tuple[tuple[int, int, int, int], ...]
    tile_grid: None = None

    @property
    def processed_size(self) -> tuple[int, int]:
        return self.whole.processed_size

    @property
    def vision_view(self) -> MergedGridGeometry:
        """The whole image on the tower's patch grid (the first crop the tower sees)."""
        return self.whole.vision_view

    @property
    def n_crops(self) -> int:
        return 1 + len(self.crops)

    @property
    def _horizontal(self) -> bool:
        return len({box[1] for box in self.boxes}) == 1

    def n_image_tokens(self, has_cls: bool) -> int:
        rows, cols = self.whole.grid_size
        return rows * cols * self.n_crops

    def _offset(self, crop: int) -> tuple[int, int]:
        rows, cols = self.whole.grid_size
        return (0, crop * cols) if self._horizontal else (crop * rows, 0)

    def token_layout(
        self, *, item: int, image: int, positions: Int[torch.Tensor, "n"], has_cls: bool
    ) -> ImageTokenLayout:
        """The whole image's cells (tile 0), then each crop's (tile k, offset rows / cols)."""
        rows, cols = self.whole.grid_size
        per_view = rows * cols
        parts = []
        for view in range(self.n_crops):
            part = ImageTokenLayout.for_image(
                item=item,
                image=image,
                positions=positions[view * per_view : (view + 1) * per_view],
                grid_size=(rows, cols),
                has_cls=False,
            )
            if view:
                top, left = self._offset(view - 1)
                part = dataclasses.replace(
                    part,
                    tile=torch.full_like(part.tile, view),
                    row=part.row + top,
                    col=part.col + left,
                    kind=torch.full_like(part.kind, PATCH),
                )
            parts.append(part)
        return ImageTokenLayout.concatenate(parts)

    def patch_ranges_per_grid(self, box: Box) -> dict[str, tuple[range, range]]:
        """The whole image's cells the box lands in (``"base"``) and the crops' (``"tiles"``,
        in the layout's side-by-side numbering; the crops a box overlaps are adjacent, so the
        cells form one rectangle)."""
        ranges = {"base": self.whole.patch_ranges(box)}
        x0, y0, x1, y1 = box
        rows_hit: list[int] = []
        cols_hit: list[int] = []
        for crop, (crop_geometry, (cx0, cy0, cx1, cy1)) in enumerate(
            zip(self.crops, self.boxes, strict=True)
        ):
            inside = (max(x0, cx0) - cx0, max(y0, cy0) - cy0, min(x1, cx1) - cx0,
                      min(y1, cy1) - cy0)  # fmt: skip
            if inside[0] >= inside[2] or inside[1] >= inside[3]:
                continue
            rows, cols = crop_geometry.patch_ranges(inside)
            top, left = self._offset(crop)
            rows_hit += [top + row for row in rows]
            cols_hit += [left + col for col in cols]
        if rows_hit:
            ranges["tiles"] = (
                range(min(rows_hit), max(rows_hit) + 1),
                range(min(cols_hit), max(cols_hit) + 1),
            )
        return ranges


class Gemma3InputProcessor:
    """HF `Gemma3Processor`'s image and text work: ``processor(images=..., text=...)`` returns
    ``input_ids``, ``attention_mask`` and ``pixel_values`` (``[n_images, 3, size, size]``) as
    HF's does (without pan-and-scan).

    Args:
        image_processor: the checkpoint's `Gemma3ImageProcessorPil`.
        tokenizer: its fast tokenizer (with ``<start_of_image>``, ``<image_soft_token>``,
            ``<end_of_image>``).
        image_seq_length: image tokens per image (``mm_tokens_per_image``: 256).
        patch_size: the tower's patch side in pixels.
    """

    num_additional_image_tokens = 0  # SigLIP: no class token
    vision_feature_select_strategy = "full"
    image_token = BOI
    """The placeholder a prompt holds for each image (expanded here)."""

    def __init__(
        self, image_processor: Any, tokenizer: Any, image_seq_length: int, patch_size: int
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_seq_length = image_seq_length
        self.image_token_id = tokenizer.convert_tokens_to_ids(SOFT)
        size = image_processor.size["height"]
        self.image_size = size
        side = round(image_seq_length**0.5)
        self.pool = size // patch_size // side
        self.patch_size = patch_size * self.pool  # the side of one image token's cell
        self.full_image_sequence = f"\n\n{BOI}{SOFT * image_seq_length}{EOI}\n\n"
        self._expansions: list[str] = []  # the last call's, per placeholder (`token_spans`)

    @property
    def pan_and_scan(self) -> bool:
        """Whether images are also cut into pan-and-scan crops (the image processor's
        ``do_pan_and_scan``)."""
        return bool(getattr(self.image_processor, "do_pan_and_scan", False))

    def with_pan_and_scan(self, enabled: bool = True, **settings: Any) -> Gemma3InputProcessor:
        """A copy whose image processor has ``do_pan_and_scan=enabled`` and `settings` (HF's
        ``pan_and_scan_min_crop_size``, ``pan_and_scan_max_num_crops``,
        ``pan_and_scan_min_ratio_to_activate``; unset ones take `PAN_AND_SCAN_DEFAULTS`). A new
        object: inputs prepared with one setting are refused by a model holding the other."""
        unknown = sorted(set(settings) - set(PAN_AND_SCAN_DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown pan-and-scan settings {unknown}; use {sorted(PAN_AND_SCAN_DEFAULTS)}"
            )
        current = self.image_processor.to_dict()
        resolved = {
            name: current.get(name) if current.get(name) is not None else default
            for name, default in PAN_AND_SCAN_DEFAULTS.items()
        }
        current.pop("image_processor_type", None)
        image_processor = type(self.image_processor)(
            **{**current, **resolved, **settings, "do_pan_and_scan": enabled}
        )
        patch_size = self.patch_size // self.pool
        return type(self)(image_processor, self.tokenizer, self.image_seq_length, patch_size)

    def _crop_boxes(self, original_size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        if not self.pan_and_scan:
            return []
        settings = {
            name: getattr(self.image_processor, name, None) or default
            for name, default in PAN_AND_SCAN_DEFAULTS.items()
        }
        return pan_and_scan_boxes(original_size, *settings.values())

    def _expansion(self, n_crops: int) -> str:
        """What one placeholder becomes with `n_crops` pan-and-scan crops (HF's wording)."""
        if not n_crops:
            return self.full_image_sequence
        return (
            f"Here is the original image {self.full_image_sequence} and here are some crops to "
            "help you see better " + " ".join([self.full_image_sequence] * n_crops)
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path, hf_config: Any) -> Gemma3InputProcessor:
        """Read a Gemma 3 folder's image processor settings and tokenizer (the PIL image
        processor class, whatever class the folder names)."""
        folder = Path(folder)
        if not any((folder / name).is_file() for name in ("processor_config.json",
                                                          "preprocessor_config.json")):  # fmt: skip
            raise FileNotFoundError(
                f"{folder} has no processor_config.json or preprocessor_config.json: a Gemma 3 "
                "checkpoint ships its image processor's settings there"
            )
        # transformers reads either layout (a nested "image_processor" section, or the
        # preprocessor file of the hub releases) into its PIL class: no torchvision.
        image_processor = Gemma3ImageProcessorPil.from_pretrained(folder)
        return cls(
            image_processor,
            AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
            hf_config.mm_tokens_per_image,
            hf_config.vision_config.patch_size,
        )

    def image_geometry(
        self, original_size: tuple[int, int], tiled: bool
    ) -> MergedGridGeometry | PanAndScanGeometry:
        """The pooled-cell grid of an image of ``(height, width)`` `original_size`, squashed
        to the tower's square (`tiled` does not apply); with pan-and-scan crops, a
        `PanAndScanGeometry`."""
        size = (self.image_size, self.image_size)
        whole = merged_grid_geometry(original_size, size, self.patch_size, self.pool)
        boxes = self._crop_boxes(original_size)
        if not boxes:
            return whole
        crops = tuple(
            merged_grid_geometry((y1 - y0, x1 - x0), size, self.patch_size, self.pool)
            for x0, y0, x1, y1 in boxes
        )
        return PanAndScanGeometry(tuple(original_size), whole, crops, tuple(boxes))

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Pixels of `images` (in prompt order) and ids of `text` with each placeholder
        expanded.

        Raises:
            ValueError: the number of images differs from the number of placeholders.
        """
        image_list, texts = processor_arguments(images, text)
        n_placeholders = sum(prompt.count(BOI) for prompt in texts)
        if n_placeholders != len(image_list):
            raise ValueError(
                f"{len(image_list)} image(s) for {n_placeholders} {BOI!r} placeholder(s): give "
                "one image per placeholder, in prompt order"
            )
        data: dict[str, Any] = {}
        n_crops: list[int] = []
        if image_list:
            unset = {  # as HF's processor fills them
                name: default
                for name, default in PAN_AND_SCAN_DEFAULTS.items()
                if getattr(self.image_processor, name, None) is None
            }
            processed = self.image_processor(image_list, return_tensors=return_tensors, **unset)
            data = {"pixel_values": processed["pixel_values"], "num_crops": processed["num_crops"]}
            n_crops = [int(n) for n in processed["num_crops"]]
        self._expansions = [self._expansion(n) for n in n_crops]
        expansions = iter(self._expansions)
        expanded = [
            "".join(
                part if index == 0 else next(expansions) + part
                for index, part in enumerate(prompt.split(BOI))
            )
            for prompt in texts
        ]
        encoded = self.tokenizer(
            expanded,
            padding=padding,
            padding_side=padding_side,
            return_tensors=return_tensors,
        )
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)

    def token_spans(
        self, texts: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per prompt, the character span in `texts[item]` of every position, from the fast
        tokenizer's offsets on the expanded text: every token of an image's expansion (the
        newlines, the markers, the image tokens, pan-and-scan's words and crops) has the span
        of its placeholder; padding (0, 0). `texts` are the last call's, whose expansions it
        kept."""
        spans = []
        expansions = iter(self._expansions)
        for text, ids, mask in zip(texts, input_ids, attention_mask, strict=True):
            expanded, blocks, cursor = "", [], 0
            for part_index, part in enumerate(text.split(BOI)):
                if part_index:
                    start = len(expanded)
                    expanded += next(expansions)
                    blocks.append((start, len(expanded), cursor, cursor + len(BOI)))
                    cursor += len(BOI)
                expanded += part
                cursor += len(part)
            encoded = self.tokenizer(expanded, return_offsets_mapping=True)
            first = int((~mask.bool()).sum())  # left padding
            if ids[first:].tolist() != encoded["input_ids"]:
                raise RuntimeError("the prompt's ids differ from the processor's")
            item_spans = []
            for start, end in encoded["offset_mapping"]:
                shift = 0
                for block_start, block_end, original_start, original_end in blocks:
                    if start >= block_end:
                        shift += (original_end - original_start) - (block_end - block_start)
                    elif start >= block_start or end > block_start:
                        start, end, shift = original_start, original_end, 0
                        break
                else:
                    start, end = start + shift, end + shift
                item_spans.append((start, end))
            item = torch.zeros(len(ids), 2, dtype=torch.long)
            item[first:] = torch.tensor(item_spans, dtype=torch.long).reshape(-1, 2)
            spans.append(item)
        return spans


register_adapter(
    own_processor_adapter(
        Gemma3InputProcessor,
        "Gemma 3",
        places_image_tokens=True,
        fingerprint_parts=lambda processor: {"image_seq_length": processor.image_seq_length},
    )
)
register_adapter(  # registered later, so it wins where it matches: pixels of several crops
    dataclasses.replace(
        own_processor_adapter(
            Gemma3InputProcessor,
            "Gemma 3 (pan-and-scan)",
            places_image_tokens=True,
            fingerprint_parts=lambda processor: {"image_seq_length": processor.image_seq_length},
            # each image's rows of pixel_values: the image itself, then its crops
            pixel_rows=lambda processor, encoded: [1 + int(n) for n in encoded["num_crops"]],
        ),
        matches=lambda processor: (
            isinstance(processor, Gemma3InputProcessor) and processor.pan_and_scan
        ),
    )
)
