"""Qwen2-VL's inputs for images: the checkpoint's image processor and tokenizer, each image
placeholder expanded to one ``<|image_pad|>`` per merged 2 x 2 cell.

transformers' `Qwen2VLProcessor` cannot be built without a video processor, and video processors
need torchvision, which mmlens does not depend on. `Qwen2VLInputProcessor` does its image half:
HF's `Qwen2VLImageProcessorPil` resizes each image to multiples of 28 px (``smart_resize``:
between ``min_pixels`` and ``max_pixels``, the aspect ratio kept) and gives its patches as rows
``[n_patches, C * T * P * P]`` with ``image_grid_thw`` (frames, patch rows, patch columns); the
tokenizer reads the prompt with ``h * w / 4`` image tokens per image. The geometry of an image is
an `ImageGeometry` of its resize with a "patch" of 28 px: one token per merged cell, row-major
(`MergedGridGeometry`, whose `vision_view` is the tower's grid of 14 px patches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BatchFeature, Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from mmlens.inputs.adapters import own_processor_adapter, register_adapter
from mmlens.inputs.geometry import ImageGeometry
from mmlens.inputs.images import processor_arguments

IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class MergedGridGeometry(ImageGeometry):
    """An `ImageGeometry` whose "patch" is a merged cell (one image token) of `merge_size` x
    `merge_size` of the vision tower's patches; `vision_view` is the tower's patch grid."""

    merge_size: int = 1

    @property
    def vision_view(self) -> ImageGeometry:
        """The same image on the vision tower's patches (a cell's side over `merge_size`):
        where vision-layer maps lie, one value per patch."""
        return dataclasses.replace(
            self, patch_size=self.patch_size // self.merge_size, merge_size=1
        )


def merged_grid_geometry(
    original_size: tuple[int, int], resized_size: tuple[int, int], cell: int, merge_size: int = 1
) -> MergedGridGeometry:
    """An image of ``(height, width)`` `original_size` resized to `resized_size` (no padding,
    no crop), one token per `cell` px square of `merge_size` x `merge_size` tower patches.

    >>> geometry = merged_grid_geometry((40, 90), (28, 84), 28, merge_size=2)
    >>> geometry.grid_size, geometry.vision_view.grid_size
    ((1, 3), (2, 6))
    """
    return MergedGridGeometry(
        original_size=tuple(original_size),
        pad_offset=(0, 0),
        padded_size=tuple(original_size),
        resized_size=tuple(resized_size),
        crop_offset=(0, 0),
        processed_size=tuple(resized_size),
        patch_size=cell,
        merge_size=merge_size,
    )


class Qwen2VLInputProcessor:
    """The image side of `Qwen2VLProcessor`: ``processor(images=..., text=...)`` returns
    ``input_ids``, ``attention_mask``, ``pixel_values`` (``[n_patches, C * T * P * P]``, every
    image's patches in turn) and ``image_grid_thw`` (``[n_images, 3]``), as HF's does for
    images.

    Args:
        image_processor: the checkpoint's `Qwen2VLImageProcessorPil`.
        tokenizer: its fast tokenizer (with ``<|image_pad|>``).
        image_token: the placeholder in prompts (expanded here).
    """

    num_additional_image_tokens = 0  # no class token
    vision_feature_select_strategy = "full"
    extra_model_inputs = ("image_grid_thw",)
    """The keys `MultimodalInput` keeps and passes to the model besides ids, mask and pixels."""
    per_image_inputs = ("image_grid_thw",)
    """Those of them with one row per image (`MultimodalInput.item` picks an item's)."""

    def __init__(self, image_processor: Any, tokenizer: Any, image_token: str = IMAGE_PAD):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.merge_size = image_processor.merge_size
        self.patch_size = image_processor.patch_size * self.merge_size  # one token's side

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Qwen2VLInputProcessor:
        """Read a Qwen2-VL folder's ``preprocessor_config.json`` and tokenizer."""
        folder = Path(folder)
        if not (folder / "preprocessor_config.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no preprocessor_config.json: a Qwen2-VL checkpoint ships its "
                "image processor's settings there"
            )
        return cls(
            Qwen2VLImageProcessorPil.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
        )

    def resized_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` the image processor resizes an image of `original_size` to."""
        size = self.image_processor.size
        return smart_resize(
            *original_size,
            factor=self.patch_size,
            min_pixels=size["shortest_edge"],
            max_pixels=size["longest_edge"],
        )

    def image_geometry(self, original_size: tuple[int, int], tiled: bool) -> MergedGridGeometry:
        """The merged-cell grid of an image of ``(height, width)`` `original_size` (`tiled`,
        which `MultimodalInput` passes to every mmlens processor, does not apply)."""
        return merged_grid_geometry(
            original_size, self.resized_size(original_size), self.patch_size, self.merge_size
        )

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Pixels and grids of `images` (in prompt order) and ids of `text` with each
        placeholder expanded to its image's merged cells.

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
            data = dict(self.image_processor(image_list, return_tensors=return_tensors))
            counts = iter((data["image_grid_thw"].prod(-1) // self.merge_size**2).tolist())
            texts = [
                "".join(
                    part if index == 0 else self.image_token * next(counts) + part
                    for index, part in enumerate(prompt.split(self.image_token))
                )
                for prompt in texts
            ]
        encoded = self.tokenizer(
            texts, padding=padding, padding_side=padding_side, return_tensors=return_tensors
        )
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)


register_adapter(
    own_processor_adapter(
        Qwen2VLInputProcessor,
        "Qwen2-VL",
        # pixel_values: every image's patches as rows, grid rows x columns of them per image
        pixel_rows=lambda processor, encoded: encoded["image_grid_thw"].prod(-1).tolist(),
    )
)
