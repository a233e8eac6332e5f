"""Token ids and each token's character span in its rendered prompt, the two ways a prompt is
tokenised (`TOKENIZATIONS`): Hugging Face's processor (the whole prompt at once) and the original
LLaVA code's `tokenizer_image_token` (the text around each image placeholder apart). The spans
are what `mmlens.inputs.segments` finds the segments from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from mmlens.inputs.templates import RenderedPrompt

TOKENIZATIONS = ("hf", "llava")
"""``"hf"``: the processor tokenises the whole prompt. ``"llava"``: the original LLaVA code's
`tokenizer_image_token`: the text before, between and after the image placeholders is tokenised
piece by piece, each piece with the tokenizer's special tokens, of which the BOS of every piece
but the first is dropped. A SentencePiece tokenizer (Llama-2, Vicuna, Mistral) then starts the
text after an image with an extra ``▁`` token, so every later position shifts by one."""


def hf_token_spans(
    tokenizer: Any,
    rendered: list[RenderedPrompt],
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    image_token_counts: list[list[int]],
    expand: Callable[[str, int], str] | None = None,
) -> list[Int[Tensor, "pos 2"]]:
    """Character span of every token in its rendered prompt, from the fast tokenizer's offsets.

    The processor expanded each placeholder into one image token per image feature
    (`image_token_counts[item]`, one count per placeholder: a tiled image's depends on its size);
    the same expanded text is tokenized again with offsets (and must give the same ids), then
    offsets are mapped back to the rendered prompt: an image token gets its placeholder's span.
    `expand` ``(placeholder, n_image_tokens) -> text`` is how the processor writes a placeholder
    out (default: the placeholder `n_image_tokens` times); every token of that text gets the
    placeholder's span (image tags around the image tokens included).
    """
    expanded_texts, placeholder_blocks = [], []
    for prompt, counts in zip(rendered, image_token_counts, strict=True):
        text, blocks, cursor = "", [], 0
        for (start, end), n_image_tokens in zip(prompt.image_spans, counts, strict=True):
            text += prompt.text[cursor:start]
            expanded_start = len(text)
            placeholder = prompt.text[start:end]
            text += expand(placeholder, n_image_tokens) if expand else placeholder * n_image_tokens
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


def llava_token_ids(
    tokenizer: Any,
    rendered: list[RenderedPrompt],
    image_token_counts: list[list[int]],
    image_token_id: int,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], list[Int[Tensor, "pos 2"]]]:
    """Ids, attention mask and character spans of the prompts as the original LLaVA code
    tokenises them (`TOKENIZATIONS`), each placeholder expanded to its image tokens,
    left-padded to one batch.

    Returns:
        ``input_ids [batch, pos]``, ``attention_mask [batch, pos]`` and per item the ``[pos, 2]``
        character spans in the rendered prompt (image tokens: their placeholder's span;
        special tokens and padding: (0, 0)).

    Examples:
        >>> from mmlens.inputs.templates import render
        >>> tokenizer = model.processor.tokenizer
        >>> prompts = [render("vicuna_v1", "Why?", n_images=1, image_token="<image>")]
        >>> ids, mask, spans = llava_token_ids(tokenizer, prompts, [[64]], model.cfg.image_token_id)
        >>> ids.shape, int((ids == model.cfg.image_token_id).sum())
        (torch.Size([1, 100]), 64)
    """
    items = []
    for prompt, counts in zip(rendered, image_token_counts, strict=True):
        cuts = [0, *(edge for span in prompt.image_spans for edge in span), len(prompt.text)]
        pieces = [(cuts[k], cuts[k + 1]) for k in range(0, len(cuts), 2)]
        encodings = [
            tokenizer(prompt.text[start:end], return_offsets_mapping=True) for start, end in pieces
        ]
        bos = tokenizer.bos_token_id
        skip = int(bos is not None and encodings[0]["input_ids"][:1] == [bos])
        ids, spans = encodings[0]["input_ids"][:skip], [(0, 0)] * skip
        for index, ((start, _), encoding) in enumerate(zip(pieces, encodings, strict=True)):
            if index:
                ids += [image_token_id] * counts[index - 1]
                spans += [prompt.image_spans[index - 1]] * counts[index - 1]
            ids += encoding["input_ids"][skip:]
            spans += [
                (first + start, last + start) if last > first else (0, 0)
                for first, last in encoding["offset_mapping"][skip:]
            ]
        items.append((ids, spans))

    length = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), length), dtype=torch.long)
    token_spans = []
    for item, (ids, spans) in enumerate(items):
        pad = length - len(ids)
        input_ids[item, pad:] = torch.tensor(ids, dtype=torch.long)
        attention_mask[item, pad:] = 1
        item_spans = torch.zeros((length, 2), dtype=torch.long)
        item_spans[pad:] = torch.tensor(spans, dtype=torch.long).reshape(-1, 2)
        token_spans.append(item_spans)
    return input_ids, attention_mask, token_spans
