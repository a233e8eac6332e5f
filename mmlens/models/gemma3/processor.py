"""Gemma 3's inputs for images: the checkpoint's image processor and tokenizer, each
``<start_of_image>`` placeholder expanded as HF's `Gemma3Processor` expands it.

HF's processor writes ``"\\n\\n<start_of_image>" + "<image_soft_token>" * 256 +
"<end_of_image>\\n\\n"`` for each placeholder; its `image_token_id` is the placeholder's
(``<start_of_image>``), not the id of the tokens the image features fill. `Gemma3InputProcessor`
does the same expansion with HF's `Gemma3ImageProcessorPil` (no torchvision), gives the image
tokens' id (``<image_soft_token>``) as `image_token_id`, and each token its character span.
Each image is squashed to the tower's square size (no padding, no crop), so its geometry is a
`MergedGridGeometry` whose cell is a pooled block of `pool` x `pool` tower patches.

Pan-and-scan crops (``do_pan_and_scan``) are not supported: `from_pretrained` refuses a
processor that turns them on, and ``prepare`` never asks for them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature, Gemma3ImageProcessorPil

from mmlens.inputs.adapters import own_processor_adapter, register_adapter
from mmlens.inputs.images import processor_arguments
from mmlens.models.qwen2_vl.processor import MergedGridGeometry, merged_grid_geometry

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"


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
        if getattr(image_processor, "do_pan_and_scan", False):
            raise NotImplementedError(
                "this Gemma 3 image processor has do_pan_and_scan=True; mmlens does not support "
                "pan-and-scan crops yet (one 896 px view per image). Set do_pan_and_scan to "
                "false in preprocessor_config.json / processor_config.json"
            )
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

    @classmethod
    def from_pretrained(cls, folder: str | Path, hf_config: Any) -> Gemma3InputProcessor:
        """Read a Gemma 3 folder's image processor settings and tokenizer (the PIL image
        processor class, whatever class the folder names)."""
        folder = Path(folder)
        settings = {}
        for name in ("processor_config.json", "preprocessor_config.json"):
            if (folder / name).is_file():
                data = json.loads((folder / name).read_text())
                settings = data.get("image_processor", data)
                break
        else:
            raise FileNotFoundError(
                f"{folder} has no processor_config.json or preprocessor_config.json: a Gemma 3 "
                "checkpoint ships its image processor's settings there"
            )
        settings = {k: v for k, v in settings.items() if k not in ("image_processor_type",)}
        image_processor = Gemma3ImageProcessorPil(**settings)
        return cls(
            image_processor,
            AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
            hf_config.mm_tokens_per_image,
            hf_config.vision_config.patch_size,
        )

    def image_geometry(self, original_size: tuple[int, int], tiled: bool) -> MergedGridGeometry:
        """The pooled-cell grid of an image of ``(height, width)`` `original_size`, squashed
        to the tower's square (`tiled` does not apply)."""
        size = (self.image_size, self.image_size)
        return merged_grid_geometry(original_size, size, self.patch_size, self.pool)

    def _expanded(self, text: str) -> str:
        return text.replace(BOI, self.full_image_sequence)

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
        if image_list:
            data = {
                "pixel_values": self.image_processor(image_list, return_tensors=return_tensors)[
                    "pixel_values"
                ]
            }
        encoded = self.tokenizer(
            [self._expanded(prompt) for prompt in texts],
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
        newlines, the markers and the image tokens) has the span of its placeholder; padding
        (0, 0)."""
        spans = []
        for text, ids, mask in zip(texts, input_ids, attention_mask, strict=True):
            expanded, blocks, cursor = "", [], 0
            for part_index, part in enumerate(text.split(BOI)):
                if part_index:
                    start = len(expanded)
                    expanded += self.full_image_sequence
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
