"""Answer probabilities: the score every knockout experiment reports."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


@dataclass
class AnswerProbability:
    """Per batch item: the scored token id and its probability."""

    token_ids: Int[Tensor, "batch"]
    probabilities: Float[Tensor, "batch"]


def answer_token_ids(model: Any, inp: Any, answer: str, item: int = 0) -> list[int]:
    """The ids `answer` gets when the model writes it right after the prompt of `item`.

    Tokenises prompt + answer together (a space between them unless the template's prompt ends
    in whitespace, as Llama-3's does), so SentencePiece/BPE word boundaries come out as in
    generation, and returns the ids after the prompt's.

    Examples:
        >>> answer_token_ids(model, inp, "red")   # [2654] ("▁red") with Llama's tokenizer
        [53]
    """
    prompt = inp.prompts[item]
    text = prompt + answer if prompt[-1:].isspace() else f"{prompt} {answer}"
    prompt_ids = model.tokenizer(prompt).input_ids
    full_ids = model.tokenizer(text).input_ids
    if full_ids[: len(prompt_ids)] != prompt_ids or len(full_ids) == len(prompt_ids):
        raise ValueError(f"could not tokenise answer {answer!r} as a continuation of the prompt")
    return full_ids[len(prompt_ids) :]


def answer_probability(
    model: Any,
    inp: Any,
    answer: str | list[str] | None = None,
    subword: Literal["first", "final"] = "first",
    fwd_hooks: list | tuple = (),
) -> AnswerProbability:
    """Probability of the answer at the position that predicts it.

    With `answer=None`: the first predicted token (the argmax at the last prompt position) and
    its probability. With an answer (one string, or one per batch item): its first sub-word at
    the last prompt position, or its final sub-word, scored by teacher-forcing the answer's
    earlier sub-words after the prompt. `fwd_hooks` (e.g. an ablation) apply to the run.

    Examples:
        >>> from mmlens.ablations import attention_knockout, window
        >>> base = answer_probability(model, inp, "red")
        >>> base.probabilities.round(decimals=3)
        tensor([1.])
        >>> hooks = attention_knockout(inp.positions("question"), inp.positions("last"),
        ...                            window(1, 3, model.cfg.n_layers))
        >>> knocked = answer_probability(model, inp, "red", fwd_hooks=hooks)
        >>> relative_change(knocked.probabilities, base.probabilities).round()   # percent
        tensor([-97.])
    """
    with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks)):
        if answer is None:
            probabilities = model(inp)[:, -1].float().softmax(-1)
            token_ids = probabilities.argmax(-1)
            return AnswerProbability(token_ids, probabilities.gather(1, token_ids[:, None])[:, 0])
        answers = [answer] * inp.batch_size if isinstance(answer, str) else list(answer)
        token_ids, probabilities = [], []
        for item, item_answer in enumerate(answers):
            ids = answer_token_ids(model, inp, item_answer, item)
            scored = ids[0] if subword == "first" else ids[-1]
            forced = ids[:-1] if subword == "final" else []
            logits = model(inp.item(item).with_tokens(forced))
            token_ids.append(scored)
            probabilities.append(logits[0, -1].float().softmax(-1)[scored])
    return AnswerProbability(torch.tensor(token_ids), torch.stack(probabilities))


def correct_answers(
    model: Any,
    inp: Any,
    answers: str | Sequence[str],
    last_logits: Float[Tensor, "batch d_vocab"] | None = None,
) -> Bool[Tensor, "batch"]:
    """Whether each item's answer is right: the greedy token at its last prompt position is the
    first sub-word of the answer as the model would write it (`answer_token_ids`).

    The one definition of a correct answer in mmlens (accuracy tables, the information-flow
    cliff, the report). `last_logits` (the last position's logits of a run the caller already
    made, e.g. under an ablation) saves the forward pass.

    Examples:
        >>> correct_answers(model, inp, "red")
        tensor([True])
    """
    items = [answers] * inp.batch_size if isinstance(answers, str) else list(answers)
    if len(items) != inp.batch_size:
        raise ValueError(f"{len(items)} answers for a batch of {inp.batch_size}")
    if last_logits is None:
        with torch.no_grad():
            last_logits = model(inp)[:, -1]
    expected = torch.tensor([answer_token_ids(model, inp, a, i)[0] for i, a in enumerate(items)])
    return last_logits.argmax(-1).cpu() == expected


def relative_change(p_new: Tensor | float, p_base: Tensor | float) -> Tensor | float:
    """`(p_new - p_base) / p_base * 100`, the papers' relative change in percent."""
    return (p_new - p_base) / p_base * 100
