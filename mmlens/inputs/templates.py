"""Conversation templates: how a question (and its image) becomes the prompt text a model sees.

A template is data (`ConversationTemplate`); `render` turns a question into a `RenderedPrompt`
that remembers the character spans `mmlens.inputs` needs to find the segments (system text, image
placeholder, question). The tokenizer adds the BOS token itself, so no template writes it. Without
an image the image slot (``<image>\\n``) is left out. In every template `last` is the last prompt
token, where the first answer token is predicted; the prompt ends where the model's answer
begins, so that prediction is the answer's first word (after `answer_prefix`), never a newline or
a header. Registered templates:

- ``"vicuna_v1"`` (the default of Vicuna/Llama-2 checkpoints): ``"{system} USER:
  <image>\\n{question} ASSISTANT:"`` with LLaVA's `vicuna_v1` system prompt ("a curious user"),
  as LLaVA's own evaluation scripts and both papers' code render it. `last` is the ':' of
  "ASSISTANT:"; answers follow after a space.
- ``"llava_v1"``: the same format with LLaVA's `llava_v1` system prompt ("a curious human");
  the shipped ``tiny-shapes`` organism was trained with it.
- ``"mistral_instruct"`` (Mistral decoders): ``"[INST] <image>\\n{question} [/INST]"``, no
  system prompt (a given one goes into the first [INST] as ``<<SYS>>\\n...\\n<</SYS>>\\n\\n``,
  as LLaVA's Llama-2-style conversations do). `last` is the last token of "[/INST]" (plain text in
  Mistral's tokenizer, not a special token); answers follow after a space.
- ``"llama3"`` (Llama-3 tokenizers): ``"<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n
  {question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"``, llava-hf's chat
  template with the generation prompt; no system turn unless one is given. `last` is the "\\n\\n"
  token that ends the assistant header (part of the generation prompt), so the first prediction
  is the answer word itself, not the header's newline.
- ``"chatml"`` (ChatML tokenizers): ``"<|im_start|>system\\nAnswer the questions.<|im_end|>
  <|im_start|>user\\n<image>\\n{question}<|im_end|><|im_start|>assistant\\n"``. `last` is the
  "\\n" after "assistant" (or the last token of "assistant\\n" if the tokenizer merges them).
- ``"llava_llama_3"``: the original LLaVA code's conversation for its Llama-3 checkpoints:
  Llama-3-Instruct's chat template over a system turn with LLaVA's Llama-3 system prompt, as
  text. That text starts with ``<|begin_of_text|>``, to which the tokenizer adds its own BOS, so
  the ids start with two BOS tokens, as in the original.
- ``"chatml_direct"``: the original code's name for ``"chatml"`` (the same text).
- ``"plain"``: the prompt is used verbatim; the caller writes the full text, ``<image>``
  placeholders included. The question is the text after the last placeholder (the whole text
  without one), surrounding whitespace excluded. `last` is the last token of the text.

`default_template` picks a template from a checkpoint's tokenizer and decoder;
`ORIGINAL_TEMPLATES` maps it to the conversation the original LLaVA code used for it. A family
registers templates of its own in its module (`register_template`); docs/checkpoints.md says
which checkpoint uses which.
``vicuna_v1``, ``llava_v1``, ``mistral_instruct``, ``chatml_direct`` and ``llava_llama_3`` render
the same text as the original `conversation.py` for one image and one question.

Examples:
    >>> rendered = render("llava_v1", "What colour is the door?", n_images=1)
    >>> rendered.text.endswith(" USER: <image>\\nWhat colour is the door? ASSISTANT:")
    True
    >>> rendered.text[slice(*rendered.question_span)]
    'What colour is the door?'
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass
from typing import Any

LLAVA_V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
"""The system prompt of LLaVA's `llava_v1` conversation ("a curious human"); LLaVA-1.5's
evaluation and both papers use `VICUNA_V1_SYSTEM_PROMPT` (template ``"vicuna_v1"``)."""

VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
"""The system prompt of LLaVA's `vicuna_v1` conversation, which the LLaVA-1.5 GQA evaluation and
the Cross-modal Information Flow scripts use ("a curious user")."""

CROSS_MODAL_SUFFIX = " \nAnswer the question using a single word or phrase."
"""The answer-format instruction the Cross-modal Information Flow scripts append to the question
(pass it as `suffix=`, so that it stays out of the `question` segment)."""

CHATML_SYSTEM_PROMPT = "Answer the questions."
"""The system prompt of the original LLaVA code's ChatML conversation (``chatml_direct``)."""

LLAVA_LLAMA_3_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
"""The system prompt of the original LLaVA code's `llava_llama_3` conversation."""

IMAGE_PLACEHOLDER = "<image>"
"""The image placeholder of llava-hf processors (a processor may name another one)."""


@dataclass(frozen=True)
class ConversationTemplate:
    """One conversation format.

    Attributes:
        name: registry key.
        pattern: `str.format` pattern with the fields ``{system}``, ``{image}`` and
            ``{question}`` (each at most once). Unused for verbatim templates.
        default_system: system text used when `render` gets ``system=None``.
        image_slot: what ``{image}`` becomes for a prompt with an image; ``{token}`` is the
            processor's image placeholder. ``{image}`` becomes "" for a text-only prompt.
        last_token: what the `last` position is, in words (documentation for users).
        system_slot: what ``{system}`` becomes for a non-empty system text ``{text}`` (e.g. a
            system turn with its header); "" for an empty one.
        answer_prefix: what comes between the prompt and the answer's first word in the
            model's training format (" " after "ASSISTANT:", nothing after Llama-3's header);
            text to put before an answer that is teacher-forced after the prompt.
        verbatim: the question is the whole prompt, placeholders included (``"plain"``).
    """

    name: str
    pattern: str
    default_system: str
    image_slot: str
    last_token: str
    system_slot: str = "{text}"
    answer_prefix: str = ""
    verbatim: bool = False


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt's text and the character spans (start, end exclusive) of its parts.

    Attributes:
        text: the prompt text with one placeholder per image (before the processor expands it).
        question_span: span of the question text.
        user_start: where the user's content (first image placeholder, else the question) starts.
        image_spans: span of each image placeholder, in order.
    """

    text: str
    question_span: tuple[int, int]
    user_start: int
    image_spans: tuple[tuple[int, int], ...]


TEMPLATES: dict[str, ConversationTemplate] = {}


def register_template(template: ConversationTemplate) -> ConversationTemplate:
    """Add `template` to the registry under `template.name` (replacing one of that name)."""
    if not template.verbatim:
        fields = [field for _, field, _, _ in string.Formatter().parse(template.pattern) if field]
        unknown = sorted(set(fields) - {"system", "image", "question"})
        if unknown or len(fields) != len(set(fields)) or "question" not in fields:
            raise ValueError(
                f"template {template.name!r}: the pattern must use {{question}} once and may use "
                f"{{system}} and {{image}} once each; got fields {fields}"
            )
    TEMPLATES[template.name] = template
    return template


def get_template(name: str | ConversationTemplate) -> ConversationTemplate:
    """The registered template called `name` (a template passes through unchanged)."""
    if isinstance(name, ConversationTemplate):
        return name
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; registered templates: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


register_template(
    ConversationTemplate(
        name="llava_v1",
        pattern="{system} USER: {image}{question} ASSISTANT:",
        default_system=LLAVA_V1_SYSTEM_PROMPT,
        image_slot="{token}\n",
        last_token="the ':' of 'ASSISTANT:' (the last prompt token)",
        answer_prefix=" ",
    )
)
register_template(  # llava_v1's format with the "curious user" system prompt
    dataclasses.replace(
        TEMPLATES["llava_v1"], name="vicuna_v1", default_system=VICUNA_V1_SYSTEM_PROMPT
    )
)
register_template(
    ConversationTemplate(
        name="mistral_instruct",
        pattern="[INST] {system}{image}{question} [/INST]",
        default_system="",
        image_slot="{token}\n",
        last_token="the last token of '[/INST]' (the last prompt token)",
        system_slot="<<SYS>>\n{text}\n<</SYS>>\n\n",
        answer_prefix=" ",
    )
)
register_template(
    ConversationTemplate(
        name="llama3",
        pattern=(
            "{system}<|start_header_id|>user<|end_header_id|>\n\n{image}{question}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        default_system="",
        image_slot="{token}\n",
        last_token=(
            "the '\\n\\n' token that ends the generation prompt "
            "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' (the last prompt token); "
            "the first predicted token is the answer's first word"
        ),
        system_slot="<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>",
    )
)
register_template(
    ConversationTemplate(
        name="chatml",
        pattern="{system}<|im_start|>user\n{image}{question}<|im_end|><|im_start|>assistant\n",
        default_system=CHATML_SYSTEM_PROMPT,
        image_slot="{token}\n",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>",
    )
)
register_template(  # the text of the original `conv_llava_llama_3.get_prompt()`
    dataclasses.replace(
        TEMPLATES["llama3"],
        name="llava_llama_3",
        pattern="<|begin_of_text|>" + TEMPLATES["llama3"].pattern,
        default_system=LLAVA_LLAMA_3_SYSTEM_PROMPT,
    )
)
register_template(dataclasses.replace(TEMPLATES["chatml"], name="chatml_direct"))
register_template(
    ConversationTemplate(
        name="plain",
        pattern="{question}",
        default_system="",
        image_slot="",
        last_token="the last token of the prompt text",
        verbatim=True,
    )
)


def render(
    template: str | ConversationTemplate,
    question: str,
    *,
    n_images: int,
    system: str | None = None,
    image_token: str = IMAGE_PLACEHOLDER,
    suffix: str = "",
) -> RenderedPrompt:
    """Render `question` with `template` for a prompt that comes with `n_images` images.

    Args:
        template: a registered name or a `ConversationTemplate`.
        question: the user's question (for ``"plain"``: the full prompt text).
        n_images: images given with this prompt. One image goes where the template puts it,
            unless the question places it; several images need one placeholder each in the
            question, where each belongs ("Compare <image> with <image>.").
        system: replaces the template's system text.
        image_token: the processor's image placeholder.
        suffix: text that follows the question inside the user's turn but is not part of the
            question (an answer-format instruction such as `CROSS_MODAL_SUFFIX`): the
            `question_span` covers the question alone.

    Raises:
        ValueError: the placeholders in the text do not match `n_images`, or the template
            cannot hold what was asked (several images, a system text for ``"plain"``).

    Examples:
        >>> render("plain", "<image>\\nWhat is this?", n_images=1).question_span
        (8, 21)
    """
    template = get_template(template)
    if template.verbatim:
        if suffix:
            raise ValueError("template 'plain' takes the whole prompt text: write the suffix in it")
        return _render_verbatim(template, question, n_images, system, image_token)
    placed = question.count(image_token)
    if placed and placed != n_images:
        raise ValueError(
            f"the question {question!r} places {placed} image(s) ({image_token!r}) but "
            f"{n_images} image(s) were given for it; give one image per placeholder"
        )
    if n_images > 1 and not placed:
        raise ValueError(
            f"{n_images} images were given for the question {question!r}; write one "
            f"{image_token!r} per image in the question where it belongs, e.g. "
            f"'Compare {image_token} with {image_token}.'"
        )
    system_text = template.default_system if system is None else system
    values = {
        "system": template.system_slot.format(text=system_text) if system_text else "",
        "image": template.image_slot.format(token=image_token) if n_images and not placed else "",
        "question": question + suffix,
    }
    text, spans = "", {}
    for literal, field, _, _ in string.Formatter().parse(template.pattern):
        text += literal
        if field:
            spans[field] = (len(text), len(text) + len(values[field]))
            text += values[field]
    image_spans = ()
    if placed:
        start, end = spans["question"][0], spans["question"][0] + len(question)
        image_spans = tuple(_placeholder_spans(text, image_token, start, end))
    elif n_images:
        start = spans["image"][0] + template.image_slot.index("{token}")
        image_spans = ((start, start + len(image_token)),)
    user_start = min([spans["question"][0], *(start for start, _ in image_spans)])
    question_span = (spans["question"][0], spans["question"][0] + len(question))
    return RenderedPrompt(text, question_span, user_start, image_spans)


def _placeholder_spans(text: str, token: str, start: int, end: int) -> list[tuple[int, int]]:
    """The spans of `token` in ``text[start:end]``, in order."""
    spans, found = [], text.find(token, start, end)
    while found >= 0:
        spans.append((found, found + len(token)))
        found = text.find(token, found + len(token), end)
    return spans


def _render_verbatim(
    template: ConversationTemplate,
    text: str,
    n_images: int,
    system: str | None,
    image_token: str,
) -> RenderedPrompt:
    if system is not None:
        raise ValueError(
            f"template {template.name!r} uses the prompt verbatim and has no system text; put the "
            "system text into the prompt instead of passing system="
        )
    image_spans = _placeholder_spans(text, image_token, 0, len(text))
    if len(image_spans) > n_images:
        raise ValueError(
            f"the prompt {text!r} has {len(image_spans)} {image_token!r} placeholder(s) but "
            f"{n_images} image(s) were given for it; pass an image for each placeholder, or remove "
            "the placeholder for a text-only prompt"
        )
    if len(image_spans) < n_images:
        raise ValueError(
            f"{n_images} image(s) were given for the prompt {text!r}, which has "
            f"{len(image_spans)} {image_token!r} placeholder(s); with template={template.name!r} "
            f"write one {image_token!r} per image where it belongs (e.g. "
            f"'{image_token}\\nWhat is this?'), or use template='llava_v1'"
        )
    question_start = image_spans[-1][1] if image_spans else 0
    question = text[question_start:]
    question_start += len(question) - len(question.lstrip())
    question_end = question_start + len(question.strip())
    user_start = image_spans[0][0] if image_spans else question_start
    return RenderedPrompt(text, (question_start, question_end), user_start, tuple(image_spans))


ORIGINAL_TEMPLATES = {
    "vicuna_v1": "vicuna_v1",
    "mistral_instruct": "mistral_instruct",
    "chatml": "chatml_direct",
    "llama3": "llava_llama_3",
}
"""A checkpoint's default template (`default_template`) -> the conversation the original LLaVA
code ran it with, which the paper presets use (the text is the same but for the system prompt
and the Llama-3 BOS). A model whose default is not listed (a shipped organism trained with
``llava_v1``, a family with a conversation of its own) keeps its own."""


def default_template(tokenizer: Any, decoder_model_type: str) -> str:
    """The chat template of a checkpoint, from its tokenizer and decoder type.

    ``"llama3"`` if the tokenizer has Llama-3's ``<|start_header_id|>``, ``"chatml"`` if it has
    ``<|im_start|>``, ``"mistral_instruct"`` for a Mistral decoder, else ``"vicuna_v1"``. (A
    family may keep ``"vicuna_v1"`` whatever the decoder: docs/checkpoints.md.)

    Examples:
        >>> from mmlens.testing import make_tokenizer
        >>> default_template(make_tokenizer("llama3"), "llama")
        'llama3'
    """
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if "<|start_header_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab:
        return "chatml"
    if decoder_model_type == "mistral":
        return "mistral_instruct"
    return "vicuna_v1"
