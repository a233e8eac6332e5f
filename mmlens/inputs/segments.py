"""Prompt segments (system, image, user, question, last) found from the fast tokenizer's
character offsets, not from token strings (docs/semantics.md, "Inputs")."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mmlens.inputs.templates import RenderedPrompt

SEGMENTS = ("system", "image", "user", "question", "last")
"""Names accepted by `MultimodalInput.positions`."""


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
