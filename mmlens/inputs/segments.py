"""Prompt segments (system, image, user, question, last) found from the fast tokenizer's
character offsets, not from token strings (docs/semantics.md, "Inputs")."""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mmlens.inputs.templates import RenderedPrompt

SEGMENTS = ("system", "image", "user", "question", "last")
"""Names accepted by `MultimodalInput.positions`."""


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
    reaches_user = real & (spans[:, 1] > spans[:, 0]) & (spans[:, 1] > prompt.user_start)
    content = reaches_user.nonzero().flatten()
    first_user = int(content[0]) if len(content) else last + 1
    if len(image):
        first_user = min(first_user, int(image[0]))
    question_start, question_end = prompt.question_span
    question = real & ~is_image & (spans[:, 0] < question_end) & (spans[:, 1] > question_start)
    # The user's turn: every text position from its start on (with one image: the positions
    # after it; with several, the question may sit between them).
    user = real & ~is_image
    user[:first_user] = False
    return {
        "system": real_positions[real_positions < first_user],
        "image": image,
        "user": user.nonzero().flatten(),
        "question": question.nonzero().flatten(),
        "last": torch.tensor([last]),
    }
