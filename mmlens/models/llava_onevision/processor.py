"""LLaVA-OneVision's processor for images: the checkpoint's image processor and tokenizer, with
each ``<image>`` expanded to the number of tokens mmlens' geometry gives.

transformers' `LlavaOnevisionProcessor` cannot be built without a video processor, and video
processors need torchvision, which mmlens does not depend on (docs/checkpoints.md). mmlens takes
images only, so `OnevisionProcessor` does the image half of that processor's work: HF's image
processor makes the pixels (`LlavaOnevisionImageProcessorPil`), the image-token count comes from
the same `AnyresGeometry` / `ImageGeometry` that lays the tokens out and that the model packs by,
and the tokenizer tokenises the expanded prompt. The parity tests check the result against HF's
model, which refuses a prompt whose image-token count differs from its features.

- An image alone in its prompt is tiled (anyres): base crop, then the best canvas' tiles,
  unpadded and, above ``anyres_max_N`` tiles' worth of patches, downsampled
  (`mmlens.models.llava_next.geometry.AnyresGrid`), each row followed by a newline token.
- An image among several in one prompt is padded to a square with the mean colour, resized, and
  gives its patch grid and one newline token (HF's ``batch_num_images``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BatchFeature, LlavaOnevisionImageProcessorPil

from mmlens.inputs.adapters import own_processor_adapter, register_adapter
from mmlens.inputs.geometry import ImageGeometry, image_size_of, size_field
from mmlens.inputs.images import processor_arguments
from mmlens.models.llava_next.geometry import AnyresGeometry


def max_tile_patches(vision_aspect_ratio: str) -> int:
    """N of ``"anyres_max_N"``: above N tiles' worth of patches the tile grid is downsampled.

    >>> max_tile_patches("anyres_max_9")
    9
    """
    match = re.fullmatch(r"anyres_max_(\d+)", str(vision_aspect_ratio))
    if match is None:
        raise ValueError(
            f"vision_aspect_ratio={vision_aspect_ratio!r}: only LLaVA-OneVision's "
            "'anyres_max_N' is supported"
        )
    return int(match.group(1))


class OnevisionProcessor:
    """The image side of `LlavaOnevisionProcessor`: ``processor(images=..., text=...)`` returns
    ``input_ids``, ``attention_mask``, ``pixel_values`` (``[n_images, max_crops, 3, side,
    side]``), ``image_sizes`` and ``batch_num_images``, as HF's does for images.

    Args:
        image_processor: the checkpoint's `LlavaOnevisionImageProcessorPil`.
        tokenizer: its fast tokenizer (with the ``<image>`` token).
        patch_size: the vision tower's patch size (the model config's).
        vision_aspect_ratio: ``"anyres_max_N"`` (the checkpoint's, 9 for the released models).
        vision_feature_select_strategy: ``"full"`` (SigLIP has no class token to drop).
        image_token: the placeholder in prompts.

    Examples:
        >>> processor = onevision_model.processor
        >>> encoded = processor(images=[image], text=["<|im_start|>user <image>\\nWhy?<|im_end|>"])
        >>> encoded["pixel_values"].shape, encoded["batch_num_images"].tolist()  # base + 3 x 3
        (torch.Size([1, 10, 3, 28, 28]), [1])
        >>> int((encoded["input_ids"] == processor.image_token_id).sum())  # 16 base + 5 x 6
        46
    """

    num_additional_image_tokens = 0  # SigLIP: no class token in the count

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        *,
        patch_size: int,
        vision_aspect_ratio: str = "anyres_max_9",
        vision_feature_select_strategy: str = "full",
        image_token: str = "<image>",
    ):
        if vision_feature_select_strategy != "full":
            raise NotImplementedError(
                f"vision_feature_select_strategy={vision_feature_select_strategy!r}: "
                "LLaVA-OneVision's SigLIP tower is read in full (every token is a patch)"
            )
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.patch_size = patch_size
        self.vision_aspect_ratio = vision_aspect_ratio
        self.max_tile_patches = max_tile_patches(vision_aspect_ratio)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    @classmethod
    def from_pretrained(cls, folder: str | Path, patch_size: int) -> OnevisionProcessor:
        """Read a llava-hf OneVision folder: ``preprocessor_config.json`` (or the
        ``image_processor`` entry of ``processor_config.json``), ``processor_config.json``'s
        ``vision_aspect_ratio``, strategy and image token, and the tokenizer."""
        folder = Path(folder)
        settings_path = folder / "processor_config.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        if (folder / "preprocessor_config.json").is_file():
            image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(folder)
        elif isinstance(settings.get("image_processor"), dict):
            image_processor = LlavaOnevisionImageProcessorPil(**_image_settings(settings))
        else:
            raise FileNotFoundError(
                f"{folder} has no preprocessor_config.json (nor an image_processor entry in "
                "processor_config.json): a llava-hf OneVision checkpoint ships its image settings"
            )
        return cls(
            image_processor,
            AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
            patch_size=patch_size,
            vision_aspect_ratio=settings.get("vision_aspect_ratio", "anyres_max_9"),
            vision_feature_select_strategy=settings.get("vision_feature_select_strategy", "full"),
            image_token=settings.get("image_token", "<image>"),
        )

    def image_geometry(
        self, original_size: tuple[int, int], tiled: bool
    ) -> AnyresGeometry | ImageGeometry:
        """Where the pixels of an image of ``(height, width)`` `original_size` go: tiled
        (`AnyresGeometry`, downsampled above ``anyres_max_N``) when it is alone in its prompt,
        else padded to a square and resized, with one newline token (`ImageGeometry`)."""
        if tiled:
            return AnyresGeometry.from_image_processor(
                self.image_processor,
                original_size,
                self.patch_size,
                max_tile_patches=self.max_tile_patches,
            )
        size = self.image_processor.size
        processed = (size_field(size, "height"), size_field(size, "width"))
        return ImageGeometry.padded_square(original_size, processed, self.patch_size, newline=True)

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        """Pixels of `images` (in prompt order) and ids of `text` with each ``<image>`` expanded
        to its image's tokens.

        Raises:
            ValueError: the number of images differs from the number of placeholders.
        """
        image_list, texts = processor_arguments(images, text)
        counts = [prompt.count(self.image_token) for prompt in texts]
        if sum(counts) != len(image_list):
            raise ValueError(
                f"{len(image_list)} image(s) for {sum(counts)} {self.image_token!r} placeholder(s): "
                "give one image per placeholder, in prompt order"
            )
        data: dict[str, Any] = {}
        if image_list:
            groups, cursor = [], 0
            for count in counts:
                if count:
                    groups.append(image_list[cursor : cursor + count])
                    cursor += count
            data = dict(self.image_processor(groups, return_tensors=return_tensors))
            token_counts = iter(
                self.image_geometry(image_size_of(image), tiled=len(group) == 1).n_image_tokens(
                    has_cls=False
                )
                for group in groups
                for image in group
            )
            texts = [
                "".join(
                    part if index == 0 else self.image_token * next(token_counts) + part
                    for index, part in enumerate(prompt.split(self.image_token))
                )
                for prompt in texts
            ]
        encoded = self.tokenizer(
            texts, padding=padding, padding_side=padding_side, return_tensors=return_tensors
        )
        return BatchFeature({**encoded, **data}, tensor_type=return_tensors)


def _image_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The image processor's keyword settings from a nested ``processor_config.json``."""
    nested = dict(settings["image_processor"])
    for key in ("image_processor_type", "processor_class"):
        nested.pop(key, None)
    return nested


register_adapter(
    own_processor_adapter(
        OnevisionProcessor,
        "LLaVA-OneVision",
        fingerprint_parts=lambda processor: {"vision_aspect_ratio": processor.vision_aspect_ratio},
    )
)
