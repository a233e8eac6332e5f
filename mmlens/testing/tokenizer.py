"""The tokenizers of the tiny checkpoints, trained in-process on a built-in corpus (offline,
deterministic: the same vocabulary on every call and in every process).

- `make_tokenizer(family)`: a small BPE tokenizer of each checkpoint family (`FAMILIES`):
  SentencePiece-style with byte fallback for Vicuna / Llama-2 and Mistral, byte-level with
  Llama-3's split regex and header tokens for Llama-3; llava-hf's ``<image>`` and ``<pad>`` on top.
- `_chatml_tokenizer`: the Vicuna-style one with ChatML's ``<|im_start|>`` / ``<|im_end|>``
  (LLaVA-Interleave, LLaVA-OneVision).
- `make_bert_tokenizer`: BERT WordPiece, as InstructBLIP's Q-Former uses.
- `tokenizer_corpus(family)`: the training corpus (questions and answers about images, LLaVA-1.5
  conversations, and each family's own conversation format).
"""

from __future__ import annotations

import json
import random

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from mmlens.inputs.templates import IMAGE_PLACEHOLDER, LLAVA_V1_SYSTEM_PROMPT

BPE_VOCAB_SIZE = 1200
"""Size of the trained BPE vocabulary (specials and learned pieces; the 256 byte tokens and the
``<image>``/``<pad>`` tokens come on top)."""

_COLOURS = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black",
            "white", "grey", "gray", "dark", "light", "colour", "color"]  # fmt: skip

_SHAPES = ["circle", "square", "triangle", "rectangle", "star", "line", "dot", "cross", "oval",
           "diamond", "stripe", "arrow"]  # fmt: skip

_OBJECTS = ["door", "cat", "dog", "car", "tree", "house", "window", "chair", "table", "ball", "cup",
            "book", "bird", "flower", "boat", "sign", "person", "clock", "bus", "train", "horse",
            "kite", "umbrella", "bottle", "phone", "lamp", "bed", "road", "sky", "cloud", "apple",
            "banana", "pizza", "bicycle", "fence", "wall", "roof", "shirt", "hat", "bag"]  # fmt: skip

_POSITIONS = ["top left corner", "top right corner", "bottom left corner", "bottom right corner",
              "centre", "center", "middle", "left side", "right side", "top", "bottom",
              "background", "foreground"]  # fmt: skip

_ADJECTIVES = ["small", "large", "big", "tiny", "round", "tall", "short", "wooden", "metal",
               "shiny", "old", "new", "striped", "spotted", "bright", "empty", "open", "closed",
               "wet", "sunny", "busy", "quiet", "happy", "sleeping", "flying", "parked"]  # fmt: skip

_VERBS = ["sitting on", "standing next to", "lying under", "hanging above", "leaning against",
          "running across", "looking at", "holding", "covering", "facing", "crossing",
          "walking past", "resting beside", "floating over", "partly hidden behind"]  # fmt: skip

_SCENES = ["kitchen", "street", "park", "beach", "garden", "office", "bedroom", "market",
           "station", "forest", "river", "mountain", "field", "playground", "harbour", "bridge",
           "city", "village", "restaurant", "classroom", "library", "museum", "airport"]  # fmt: skip

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

FAMILIES = ("vicuna", "mistral", "llama3")
"""Checkpoint families `make_tokenizer` and `build_tiny_llava_next` know: Vicuna / Llama-2
(SentencePiece-style BPE, Llama decoder), Mistral (SentencePiece-style BPE, Mistral decoder) and
Llama-3 (byte-level BPE with header tokens, Llama decoder with grouped-query attention)."""

_FAMILY_CONVERSATIONS = {
    "vicuna": None,  # the common corpus already holds LLaVA-1.5 / Vicuna conversations
    "mistral": "[INST] {question} [/INST] {answer}",
    "llama3": "user\n\n{question}\nassistant\n\n{answer}",
}

LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""Llama-3's pre-tokenizer regex (tiktoken's cl100k pattern with digits in groups of three)."""

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)


def tokenizer_corpus(family: str = "vicuna") -> list[str]:
    """The built-in training corpus of `make_tokenizer`: ~700 lines about images (~850 for
    Mistral and Llama-3).

    Questions and answers about colours, shapes, objects, counts and positions, LLaVA-1.5
    conversations (system prompt, "USER:", "ASSISTANT:"), generated with a fixed seed; Mistral and
    Llama-3 add 150 conversations in their own format (``[INST] ... [/INST]``; ``user\\n\\n``
    ... ``assistant\\n\\n``, without the special tokens, which are never learned). The Vicuna
    and Mistral corpora hold no newline, so "\\n" is encoded with the byte-fallback token
    ``<0x0A>`` as in Llama-2's and Mistral's vocabularies; Llama-3's learns "\\n\\n" as a token.

    Examples:
        >>> tokenizer_corpus()[0][:60]
        'A chat between a curious human and an artificial intelligenc'
    """
    _check_family(family)
    rng = random.Random(0)
    question_forms = [
        "What colour is the {obj}?",
        "What color is the {obj} in the {pos}?",
        "Is there a {col} {shape} in the {pos}?",
        "How many {shape}s are in the image?",
        "Where is the {col} {obj}?",
        "What is in the {pos} of the image?",
        "Is the {obj} to the left or to the right of the {obj2}?",
        "What shape is the {col} object?",
        "Which object is above the {obj}?",
        "Describe the image in detail.",
        "What is the {obj} next to?",
        "Can you see a {obj} in this picture?",
        "Is the {adj} {obj} {verb} the {obj2}?",
        "What is the {obj} doing in the {scene}?",
        "Where was this photo taken?",
        "Why is the {obj} {adj}?",
        "What time of day is it in the {scene}?",
    ]
    answer_forms = [
        "The {obj} is {col}.",
        "There is a {col} {shape} in the {pos} of the image.",
        "There are {num} {shape}s.",
        "Yes, there is a {col} {obj} near the {obj2}.",
        "No, the {pos} is empty.",
        "The {col} {obj} is on the {pos}.",
        "It is a {col} {shape}.",
        "The image shows a {obj} and a {obj2} under a {col} sky.",
        "A {col} {obj} stands in front of a {col2} {obj2}.",
        "A {adj} {obj} is {verb} a {col} {obj2} in the {scene}.",
        "This photo was taken in a {adj} {scene}.",
        "The {obj} looks {adj} because it is {verb} the {obj2}.",
        "In the {pos} there are {num} {adj} {obj}s.",
    ]

    def fill(form: str) -> str:
        return form.format(
            obj=rng.choice(_OBJECTS),
            obj2=rng.choice(_OBJECTS),
            col=rng.choice(_COLOURS),
            col2=rng.choice(_COLOURS),
            shape=rng.choice(_SHAPES),
            pos=rng.choice(_POSITIONS),
            num=rng.choice(_NUMBERS),
            adj=rng.choice(_ADJECTIVES),
            verb=rng.choice(_VERBS),
            scene=rng.choice(_SCENES),
        )

    lines = [LLAVA_V1_SYSTEM_PROMPT]
    lines += [fill(rng.choice(question_forms)) for _ in range(250)]
    lines += [fill(rng.choice(answer_forms)) for _ in range(250)]
    lines += [
        f"{LLAVA_V1_SYSTEM_PROMPT} USER: {fill(rng.choice(question_forms))} "
        f"ASSISTANT: {fill(rng.choice(answer_forms))}"
        for _ in range(100)
    ]
    lines += [f"{word} {word}s" for word in _OBJECTS + _SHAPES + _SCENES]
    lines += [" ".join(words) for words in (_COLOURS, _NUMBERS, _ADJECTIVES, _VERBS)]
    lines.append("USER: ASSISTANT: image picture photo")
    conversation = _FAMILY_CONVERSATIONS[family]
    if conversation is not None:
        lines += [
            conversation.format(
                question=fill(rng.choice(question_forms)), answer=fill(rng.choice(answer_forms))
            )
            for _ in range(150)
        ]
    return lines


def make_tokenizer(family: str = "vicuna") -> PreTrainedTokenizerFast:
    """A small fast tokenizer of a checkpoint family, trained in-process (deterministic).

    - ``"vicuna"`` (Llama-2 / Vicuna) and ``"mistral"``: SentencePiece-style BPE with byte
      fallback (``<0x00>`` ... ``<0xFF>``), a Metaspace("▁") pre-tokenizer and decoder, ``<s>``
      prepended by the post-processor. Ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>`` as in Llama.
      Mistral's corpus adds ``[INST] ... [/INST]`` conversations; as in
      llava-v1.6-mistral-7b-hf's tokenizer, ``[INST]`` and ``[/INST]`` are plain text, not
      special tokens.
    - ``"llama3"``: byte-level BPE (GPT-2 byte alphabet, Llama-3's split regex), the learned
      vocabulary first, then Llama-3's special tokens ``<|begin_of_text|>``, ``<|end_of_text|>``,
      ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (the EOS token);
      ``<|begin_of_text|>`` is prepended by the post-processor, offsets keep the leading space
      of a word ("Ġdoor" covers " door").

    All families: left padding, and llava-hf's extra tokens appended after the vocabulary:
    ``<image>`` (the image placeholder, registered as ``image_token``) and ``<pad>``. Training on
    `tokenizer_corpus(family)` gives the same vocabulary on every call and in every process.

    Returns:
        a `PreTrainedTokenizerFast` of ~1200 tokens; it round-trips through `save_pretrained`
        and `AutoTokenizer.from_pretrained(folder)`.

    Examples:
        >>> tokenizer = make_tokenizer()
        >>> tokenizer("What colour is the door?").input_ids[0] == tokenizer.bos_token_id
        True
        >>> tokenizer.image_token, tokenizer.padding_side
        ('<image>', 'left')
        >>> make_tokenizer("llama3").convert_ids_to_tokens(make_tokenizer("llama3")("Hi").input_ids)
        ['<|begin_of_text|>', 'H', 'i']
    """
    _check_family(family)
    if family == "llama3":
        return _byte_level_tokenizer(tokenizer_corpus(family))
    return _sentencepiece_style_tokenizer(tokenizer_corpus(family))


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown checkpoint family {family!r}; known: {', '.join(FAMILIES)}")


def _sentencepiece_style_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Llama-2-style BPE with byte fallback (see `make_tokenizer`)."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, special_tokens=specials, show_progress=False
    )
    trained.train_from_iterator(corpus, trainer)
    trained_model = json.loads(trained.to_str())["model"]

    # Llama's layout: specials, the 256 byte tokens, then the learned pieces in training order.
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({f"<0x{byte:02X}>": len(specials) + byte for byte in range(256)})
    for piece, _ in sorted(trained_model["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(merge) for merge in trained_model["merges"]]
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    backend.pre_tokenizer = metaspace
    backend.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="first", split=True),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in [*specials, IMAGE_PLACEHOLDER, "<pad>"]
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return _fast_tokenizer(backend, bos="<s>", eos="</s>", unk="<unk>")


def _byte_level_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Llama-3-style byte-level BPE (see `make_tokenizer`)."""
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    backend.decoder = decoders.ByteLevel()
    special_tokens = [*LLAMA3_SPECIAL_TOKENS, IMAGE_PLACEHOLDER, "<pad>"]
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in special_tokens]
    )
    bos = LLAMA3_SPECIAL_TOKENS[0]
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, backend.token_to_id(bos))],
            ),
        ]
    )
    return _fast_tokenizer(backend, bos=bos, eos="<|eot_id|>", unk=None)


def _fast_tokenizer(
    backend: Tokenizer, *, bos: str, eos: str, unk: str | None
) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        model_max_length=4096,
    )


def _chatml_tokenizer(extra: list[str] = ()) -> PreTrainedTokenizerFast:
    """The SentencePiece-style test tokenizer with ChatML's turn markers (and `extra` tokens)."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *extra]}
    )
    return tokenizer


def make_bert_tokenizer() -> PreTrainedTokenizerFast:
    """A small BERT WordPiece tokenizer (lower-cased, ``[CLS] ... [SEP]``, right padding), as
    InstructBLIP's Q-Former uses, trained in-process on `tokenizer_corpus()` (deterministic).

    Examples:
        >>> make_bert_tokenizer()("What colour is the door?").input_ids[0] == 101
        True
    """
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # BERT's ids: [PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103; the learned pieces after.
    trainer = trainers.WordPieceTrainer(
        vocab_size=900, special_tokens=specials, show_progress=False
    )
    backend.train_from_iterator(tokenizer_corpus(), trainer)
    vocab = backend.get_vocab()
    learned = sorted((token for token in vocab if token not in specials), key=vocab.get)
    order = ["[PAD]", *(f"[unused{i}]" for i in range(99)), *specials[1:], *learned]
    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    backend.decoder = decoders.WordPiece()
    return BertTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
        cls_token="[CLS]", mask_token="[MASK]", padding_side="right", model_max_length=512,
    )  # fmt: skip
