"""Qwen-VL's inputs: the prompt's ids with each image as ``<img>`` + 256 ``<imgpad>`` +
``</img>``, and the image squashed to the tower's square input (bicubic) and normalised with
CLIP's mean and deviation, as the release's ``image_transform`` does.

The release writes an image into the text as ``<img>path</img>``; its tokenizer turns the path's
bytes into tokens and pads them to 256 with ``<imgpad>``, and its model loads the file and puts
the resampler's 256 outputs over those 256 positions. mmlens takes images as objects, so its
placeholder is ``<img></img>`` (an empty path): the 256 positions are all ``<imgpad>``, which
the decoder never sees either (docs/checkpoints.md, "Qwen-VL").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature, BlipImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from mmlens.inputs.adapters import own_processor_adapter, register_adapter
from mmlens.inputs.geometry import ImageGeometry, QueryGeometry
from mmlens.inputs.images import processor_arguments
from mmlens.models.qwen_vl.release import IMAGE_SPAN, qwen_tokenizer

RESAMPLER_PATTERN_HOOK = "resampler.hook_pattern"
"""Where Qwen-VL's queries read the patches (named in `QueryGeometry`'s messages)."""


class QwenVLProcessor:
    """``processor(images=..., text=...)`` for Qwen-VL: ``input_ids`` and ``attention_mask``
    (left-padded with ``<|endoftext|>``) where each ``<img></img>`` of a prompt becomes
    ``<img>`` + `n_queries` ``<imgpad>`` + ``</img>``, and ``pixel_values``
    (``[n_images, 3, side, side]``).

    Examples:
        >>> processor = qwen_vl.processor
        >>> encoded = processor(images=[image], text=["Picture 1: <img></img>\\nWhat is it?"])
        >>> ids = encoded["input_ids"][0].tolist()
        >>> ids.count(processor.image_token_id), processor.tokenizer.decode(ids[-4:])
        (16, 'What is it?')
    """

    image_token = "<img></img>"
    """The placeholder of one image in a prompt (the release's image tag with an empty path)."""
    num_additional_image_tokens = 0
    vision_feature_select_strategy = "full"  # the tower has no class token

    def __init__(self, image_processor: Any, tokenizer: Any, *, n_queries: int, patch_size: int):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.n_queries = n_queries
        self.patch_size = patch_size
        self.image_start_id, self.image_end_id, self.image_token_id = (
            tokenizer.convert_tokens_to_ids(tag) for tag in ("<img>", "</img>", "<imgpad>")
        )

    @classmethod
    def from_release(
        cls, folder: str | Path, *, image_size: int, patch_size: int, n_queries: int = IMAGE_SPAN
    ) -> QwenVLProcessor:
        """The processor of a Qwen-VL release: its tokenizer (``qwen.tiktoken``) and the
        release's image transform at `image_size` px (448 in every release)."""
        image_processor = BlipImageProcessorPil(
            do_resize=True,
            size={"height": image_size, "width": image_size},
            resample=PILImageResampling.BICUBIC,
            do_rescale=True,
            rescale_factor=1 / 255,
            do_normalize=True,
            image_mean=OPENAI_CLIP_MEAN,
            image_std=OPENAI_CLIP_STD,
            do_convert_rgb=True,
        )
        return cls(
            image_processor,
            qwen_tokenizer(Path(folder)),
            n_queries=n_queries,
            patch_size=patch_size,
        )

    def image_geometry(self, original_size: tuple[int, int], tiled: bool) -> QueryGeometry:
        """The tower's view of an image of ``(height, width)`` `original_size` (squashed to the
        square input), behind `n_queries` query tokens (`tiled` does not apply: one crop)."""
        vision = ImageGeometry.from_image_processor(
            self.image_processor, original_size, self.patch_size
        )
        return QueryGeometry(vision, self.n_queries, RESAMPLER_PATTERN_HOOK)

    def _ids(self, text: str) -> list[int]:
        """`text`'s ids with each ``<img></img>`` expanded to the image's token span."""
        ids = []
        for token in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
            if ids and ids[-1] == self.image_start_id:
                if token != self.image_end_id:
                    raise ValueError(
                        f"the prompt {text!r} has text between <img> and </img>: mmlens passes "
                        "images as objects, so write each image as '<img></img>' (an image path "
                        "inside the tags is the release's own way; model.prepare places it)"
                    )
                ids += [self.image_token_id] * self.n_queries
            elif token == self.image_token_id:
                raise ValueError(f"the prompt {text!r} has a bare <imgpad>: write '<img></img>'")
            ids.append(token)
        if ids and ids[-1] == self.image_start_id:
            raise ValueError(f"the prompt {text!r} ends in an unclosed <img>: write '<img></img>'")
        return ids

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
        ids = [self._ids(prompt) for prompt in texts]
        n_slots = sum(item.count(self.image_start_id) for item in ids)
        if n_slots != len(image_list):
            raise ValueError(
                f"{len(image_list)} image(s) for {n_slots} '<img></img>' placeholder(s): give "
                "one image per placeholder"
            )
        encoded = self.tokenizer.pad(
            {"input_ids": ids},
            padding=padding,
            padding_side=padding_side,
            return_tensors=return_tensors,
        )
        features = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        if image_list:
            pixels = self.image_processor(image_list, return_tensors=return_tensors)
            features["pixel_values"] = pixels["pixel_values"]
        return BatchFeature(features)

    def token_spans(
        self, texts: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """Per prompt, the character span in `texts[item]` of every position, from the fast
        tokenizer's offsets: an image's ``<imgpad>`` tokens have the span of its whole
        ``<img></img>`` placeholder; padding (0, 0)."""
        spans = []
        for text, ids, mask in zip(texts, input_ids, attention_mask, strict=True):
            encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            item_spans = []
            for token, (start, end) in zip(
                encoded["input_ids"], encoded["offset_mapping"], strict=True
            ):
                if token == self.image_end_id:
                    image_start = item_spans[-1][0]
                    item_spans += [(image_start, end)] * self.n_queries
                item_spans.append((start, end))
            first = int((~mask.bool()).sum())  # left padding
            if ids[first:].tolist() != self._ids(text):
                raise RuntimeError("the prompt's ids differ from the processor's")
            item = torch.zeros(len(ids), 2, dtype=torch.long)
            item[first:] = torch.tensor(item_spans, dtype=torch.long).reshape(-1, 2)
            spans.append(item)
        return spans


register_adapter(
    own_processor_adapter(
        QwenVLProcessor,
        "Qwen-VL",
        places_image_tokens=True,
        fingerprint_parts=lambda processor: {"n_queries": processor.n_queries},
    )
)
