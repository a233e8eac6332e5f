"""InstructBLIP's inputs: the decoder's ids with the image's query tokens first, the Q-Former's
copy of the instruction in its own (BERT) vocabulary, and the pixels.

transformers' `InstructBlipProcessor` prepends `num_query_tokens` image tokens to each tokenised
prompt (before its BOS) and pads the batch before prepending them, so that padding lands between
the image and the text. `QFormerProcessor` gives the same ids for a single prompt (tested) and
left-pads a batch in front of the image block, as every other mmlens input, so that a padded item
equals the item alone. It also gives each token its character span, for the segments.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BatchFeature, BlipImageProcessorPil

from mmlens.inputs.adapters import own_processor_adapter, register_adapter
from mmlens.inputs.geometry import ImageGeometry, QueryGeometry
from mmlens.inputs.images import processor_arguments

QFORMER_PATTERN_HOOK = "qformer.blocks.{l}.cross_attn.hook_pattern"
"""Where the Q-Former's queries read the patches (named in `QueryGeometry`'s messages)."""


class QFormerProcessor:
    """``processor(images=..., text=...)`` for InstructBLIP: ``input_ids`` and
    ``attention_mask`` for the decoder (each prompt starts with its image placeholder, which
    becomes `num_query_tokens` image tokens before the BOS), ``qformer_input_ids`` and
    ``qformer_attention_mask`` (the instruction without the placeholder, BERT-tokenised,
    right-padded) and ``pixel_values`` (``[n_images, 3, side, side]``).

    Examples:
        >>> processor = blip_model.processor
        >>> encoded = processor(images=[image], text=["<image>What colour is the star?"])
        >>> encoded["input_ids"][0, :10].tolist() == [processor.image_token_id] * 8 + [
        ...     processor.tokenizer.bos_token_id, encoded["input_ids"][0, 9].item()]
        True
        >>> processor.qformer_tokenizer.decode(encoded["qformer_input_ids"][0])
        '[CLS] what colour is the star? [SEP]'
    """

    num_additional_image_tokens = 0
    extra_model_inputs = ("qformer_input_ids", "qformer_attention_mask")
    """The keys `MultimodalInput` keeps and passes to the model besides ids, mask and pixels."""

    def __init__(
        self,
        image_processor: Any,
        tokenizer: Any,
        qformer_tokenizer: Any,
        *,
        num_query_tokens: int,
        patch_size: int,
        image_token: str = "<image>",
    ):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        self.num_query_tokens = num_query_tokens
        self.patch_size = patch_size
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.vision_feature_select_strategy = "full"
        if self.image_token_id in (None, tokenizer.unk_token_id):
            raise ValueError(
                f"the tokenizer has no {image_token!r} token; InstructBLIP checkpoints saved by "
                "transformers >= 4.47 carry it (and its id in config.image_token_index)"
            )

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, num_query_tokens: int, patch_size: int
    ) -> QFormerProcessor:
        """Read a transformers InstructBLIP folder: ``preprocessor_config.json``, the
        tokenizer, and the Q-Former's tokenizer in ``qformer_tokenizer/``."""
        folder = Path(folder)
        if not (folder / "qformer_tokenizer").is_dir():
            raise FileNotFoundError(
                f"{folder} has no qformer_tokenizer/ folder: an InstructBLIP checkpoint saved by "
                "InstructBlipProcessor.save_pretrained ships the Q-Former's BERT tokenizer there"
            )
        settings_path = folder / "processor_config.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        return cls(
            BlipImageProcessorPil.from_pretrained(folder),
            AutoTokenizer.from_pretrained(folder, trust_remote_code=False),
            AutoTokenizer.from_pretrained(folder / "qformer_tokenizer", trust_remote_code=False),
            num_query_tokens=settings.get("num_query_tokens", num_query_tokens),
            patch_size=patch_size,
        )

    def image_geometry(self, original_size: tuple[int, int], tiled: bool) -> QueryGeometry:
        """The vision tower's geometry of an image of ``(height, width)`` `original_size` (BLIP
        squashes it to the input size), behind `num_query_tokens` query tokens (`tiled`, which
        `MultimodalInput` passes to every mmlens processor, does not apply: one crop)."""
        vision = ImageGeometry.from_image_processor(
            self.image_processor, original_size, self.patch_size
        )
        return QueryGeometry(vision, self.num_query_tokens, QFORMER_PATTERN_HOOK)

    def _instruction(self, text: str) -> str:
        """`text` without its leading placeholder (the one place InstructBLIP has an image)."""
        if self.image_token not in text:
            raise ValueError(
                "InstructBLIP prompts have one image each, before the instruction; this prompt "
                f"has no {self.image_token!r} (pass an image with every prompt)"
            )
        if not text.startswith(self.image_token) or text.count(self.image_token) != 1:
            raise ValueError(
                f"InstructBLIP takes one image per prompt, first: {text!r} has "
                f"{text.count(self.image_token)} {self.image_token!r} (use template='instructblip')"
            )
        return text[len(self.image_token) :]

    def __call__(
        self,
        images: Any = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        padding_side: str = "left",
        return_tensors: str = "pt",
    ) -> BatchFeature:
        image_list, texts = processor_arguments(images, text)
        instructions = [self._instruction(prompt) for prompt in texts]
        if len(image_list) != len(texts):
            raise ValueError(f"{len(image_list)} image(s) for {len(texts)} prompt(s): one each")
        image_block = [self.image_token_id] * self.num_query_tokens
        ids = [image_block + self.tokenizer(line)["input_ids"] for line in instructions]
        encoded = self.tokenizer.pad(
            {"input_ids": ids},
            padding=padding,
            padding_side=padding_side,
            return_tensors=return_tensors,
        )
        qformer = self.qformer_tokenizer(instructions, padding=True, return_tensors=return_tensors)
        pixels = self.image_processor(image_list, return_tensors=return_tensors)
        return BatchFeature(
            {
                "input_ids": encoded["input_ids"],
                "attention_mask": encoded["attention_mask"],
                "qformer_input_ids": qformer["input_ids"],
                "qformer_attention_mask": qformer["attention_mask"],
                "pixel_values": pixels["pixel_values"],
            }
        )

    def token_spans(
        self, texts: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per prompt, the character span in `texts[item]` of every position (image tokens:
        their placeholder's; BOS and padding: (0, 0)), from the fast tokenizer's offsets."""
        spans = []
        for text, ids, mask in zip(texts, input_ids, attention_mask, strict=True):
            instruction = self._instruction(text)
            encoded = self.tokenizer(instruction, return_offsets_mapping=True)
            shift = len(self.image_token)
            item = torch.zeros(len(ids), 2, dtype=torch.long)
            first = int((~mask.bool()).sum())  # left padding
            image_end = first + self.num_query_tokens
            if ids[image_end:].tolist() != encoded["input_ids"]:
                raise RuntimeError("the instruction's ids differ from the processor's")
            item[first:image_end] = torch.tensor([0, shift])
            offsets = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2)
            real = offsets[:, 1] > offsets[:, 0]
            item[image_end:][real] = offsets[real] + shift
            spans.append(item)
        return spans


register_adapter(
    own_processor_adapter(
        QFormerProcessor,
        "InstructBLIP",
        places_image_tokens=True,
        fingerprint_parts=lambda processor: {
            "qformer_vocab": sorted(processor.qformer_tokenizer.get_vocab().items()),
            "num_query_tokens": processor.num_query_tokens,
        },
    )
)
