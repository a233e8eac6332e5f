"""Checks of `prepare`'s text arguments: a question must be text, and a prompt longer than the
model's positions is warned about, and so, once each, are words the tokenizer does not know
(docs/semantics.md, "Inputs")."""

from __future__ import annotations

import warnings
from typing import Any


def check_prompts(prompts: Any) -> None:
    """`prompts` is a string or a list of strings, none empty or blank; else a ValueError (or
    TypeError) that says which one.

    >>> check_prompts(["What colour is it?", " "])
    Traceback (most recent call last):
    ...
    ValueError: prompt 1 is empty (' '); pass the question's text
    """
    items = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(items, (list, tuple)):
        raise TypeError(
            f"the prompt must be a string (or a list of strings), got {type(prompts).__name__}"
        )
    for index, prompt in enumerate(items):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {index} must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"prompt {index} is empty ({prompt!r}); pass the question's text")


def warn_if_too_long(n_positions: int, max_positions: int | None) -> None:
    """Warn when a prepared input has more positions than the model was trained on
    (``max_position_embeddings``): it still runs, but positions past the limit are
    extrapolated and results there are not to be trusted."""
    if max_positions and n_positions > max_positions:
        warnings.warn(
            f"the input has {n_positions} positions, more than the model's "
            f"max_position_embeddings ({max_positions}); positions past it are extrapolated. "
            "Shorten the prompt, or use fewer or smaller images",
            stacklevel=3,
        )


_REPORTED_UNKNOWN: set[str] = set()
"""Words `warn_unknown_words` has already reported in this process."""


def warn_unknown_words(inp: Any, unk_token_id: int | None) -> None:
    """Warn, once per word and process, about words of `inp`'s prompts that the tokenizer maps
    to its unknown token (`unk_token_id`, e.g. a word-level vocabulary such as the shipped
    organism's): the model sees ``<unk>`` there, not the word, and answers as if the word
    were not in the prompt. Padding is not read (a tokenizer may pad with ``<unk>``)."""
    if unk_token_id is None:
        return
    words = []
    for item, prompt in enumerate(inp.prompts):
        unknown = (inp.input_ids[item] == unk_token_id) & inp.attention_mask[item].bool()
        for start, end in inp.token_spans[item][unknown.cpu()].tolist():
            words.append(prompt[start:end])
    new = sorted(set(words) - _REPORTED_UNKNOWN)
    if new:
        _REPORTED_UNKNOWN.update(new)
        warnings.warn(
            f"the tokenizer does not know the word(s) {', '.join(map(repr, new))}: the model "
            "reads <unk> for each (reported once); a word-level vocabulary knows only the "
            "words it was trained on, so leave them out of the prompt (e.g. a preset's answer "
            "instruction: prepare without the preset's suffix, suffix=...)",
            stacklevel=3,
        )
