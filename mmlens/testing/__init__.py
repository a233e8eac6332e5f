"""Tiny random llava-hf checkpoints, built locally and offline (for tests, benchmarks, the demo).

`build_tiny_llava(folder)` (LLaVA-1.5) and `build_tiny_llava_next(folder, family=...)` (LLaVA-NeXT)
write folders that `transformers` loads like real llava-hf checkpoints:
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration.from_pretrained(folder)``
and ``AutoProcessor.from_pretrained(folder)``. The tokenizers are real (small) BPE tokenizers of
each checkpoint family, trained in-process on a built-in corpus (`make_tokenizer`), so segment
detection and offsets are exercised as with a real checkpoint; the weights are random but far
from uniform so parity tests have teeth.

Examples:
    >>> from mmlens.testing import build_tiny_llava, build_tiny_llava_next
    >>> folder = build_tiny_llava("checkpoints/tiny-llava")
    >>> next_folder = build_tiny_llava_next("checkpoints/tiny-next", family="llama3")
    >>> type(mmlens.from_pretrained(next_folder)).__name__
    'HookedLlavaNext'
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
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
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from mmlens.inputs.templates import IMAGE_PLACEHOLDER, LLAVA_V1_SYSTEM_PROMPT

TEST_IMAGE_SIZES = {"square": (56, 56), "wide": (88, 48), "tall": (40, 80)}
"""(width, height) of the standard test images. Padded to a square of side 56, 88 or 80 and
resized to 56, no pixel centre of these images lands exactly on a border between processed pixels
(the side is a multiple of 8), so a box-filter resize (the `patches_in_box` test oracle) has no
ties to break; a 90 x 50 image would have some."""

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


_CLIP_PIXELS = dict(
    resample=PILImageResampling.BICUBIC,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=OPENAI_CLIP_MEAN,
    image_std=OPENAI_CLIP_STD,
    do_convert_rgb=True,
)
"""Resampling, rescaling and normalisation shared by llava-1.5's and llava-NeXT's processors."""


def make_image_processor(
    image_size: int = 56, *, pad_to_square: bool = True
) -> LlavaImageProcessorPil:
    """A llava-1.5 image processor (PIL backend) for `image_size` x `image_size` vision input.

    Pads to a square with the mean colour (image centred), resizes the shorter side to
    `image_size` (bicubic), centre-crops `image_size` x `image_size`, rescales to [0, 1] and
    normalises with the CLIP mean and std. ``pad_to_square=False`` gives the plain CLIP
    preprocessing (no padding, so the crop cuts off the ends of the longer side).

    Examples:
        >>> import PIL.Image
        >>> pixels = make_image_processor(56)(PIL.Image.new("RGB", (90, 50)), return_tensors="pt")
        >>> pixels["pixel_values"].shape
        torch.Size([1, 3, 56, 56])
    """
    return LlavaImageProcessorPil(
        do_pad=pad_to_square,
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        **_CLIP_PIXELS,
    )


def make_anyres_image_processor(
    image_size: int = 28, grid_pinpoints: list[list[int]] | None = None
) -> LlavaNextImageProcessorPil:
    """A llava-NeXT ("anyres") image processor (PIL backend) with llava-v1.6's settings.

    Per image: the base crop is the whole image resized (squashed) to `image_size` x
    `image_size`; the tiles come from the image resized to fit the best of `grid_pinpoints`
    (``[height, width]`` each, multiples of `image_size`) keeping its aspect ratio, centred on a
    black canvas of that size, cut into `image_size` x `image_size` tiles in row-major order.
    Bicubic resampling, rescaling to [0, 1] and CLIP normalisation as in llava-1.5. Images with
    fewer tiles are padded with all-zero crops to the batch's largest count.

    Args:
        image_size: the vision tower's input side (336 for llava-v1.6).
        grid_pinpoints: candidate canvas sizes; default `TINY_GRID_PINPOINTS` (llava-v1.6's
            ``[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]`` at 28 px a tile).

    Examples:
        >>> import PIL.Image
        >>> processor = make_anyres_image_processor(28)
        >>> image = PIL.Image.new("RGB", (90, 40))        # the base crop, then 1 x 3 tiles
        >>> processor(image, return_tensors="pt")["pixel_values"].shape
        torch.Size([1, 4, 3, 28, 28])
    """
    return LlavaNextImageProcessorPil(
        do_pad=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=grid_pinpoints or _scaled_pinpoints(image_size),
        **_CLIP_PIXELS,
    )


def _scaled_pinpoints(image_size: int) -> list[list[int]]:
    """llava-v1.6's grid pinpoints for tiles of `image_size` pixels."""
    return [[image_size * rows, image_size * cols] for rows, cols in _LLAVA_V16_TILE_GRIDS]


_LLAVA_V16_TILE_GRIDS = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]
TINY_GRID_PINPOINTS = _scaled_pinpoints(28)
"""llava-v1.6's tile grids (1x2, 2x1, 2x2, 3x1, 1x3) at 28 px a tile: ``[[28, 56], [56, 28], ...]``."""


def make_test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image: a colour gradient with red, green and blue rectangles.

    Examples:
        >>> make_test_image(*TEST_IMAGE_SIZES["wide"]).size
        (88, 48)
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    gradient = [255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), np.full(x.shape, 128.0)]
    pixels = np.stack(gradient, axis=-1)
    for colour in ([230, 30, 30], [30, 200, 60], [40, 60, 230]):
        x0, y0 = rng.integers(0, width - width // 4), rng.integers(0, height - height // 4)
        pixels[y0 : y0 + height // 4, x0 : x0 + width // 4] = colour
    return Image.fromarray(pixels.astype(np.uint8))


def build_tiny_llava(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int = 128,
    vision_layers: int = 3,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 56,
    patch_size: int = 14,
    vision_feature_layer: int | list[int] = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    rope_theta: float = 10000.0,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-1.5 checkpoint (safetensors + processor) to `path`.

    Architecture as llava-1.5: CLIP ViT (quick-GELU, pre-LayerNorm) -> features of
    `vision_feature_layer` (an int, or a list of ints whose features are concatenated) ->
    two-layer projector -> Llama decoder (RMSNorm, rotary, SiLU gated MLP, untied unembedding).
    ``(image_size // patch_size) ** 2`` image tokens per image, plus the CLS token when
    `vision_feature_select_strategy` is ``"full"``.

    `projector_hidden_act` is any name of `transformers.activations.ACT2FN` (``"gelu"`` as in
    llava-1.5). HF's `LlavaMultiModalProjector` always has two linear layers; ``"linear"`` maps to
    the identity activation, which is how HF expresses a linear projector (their product).

    Weights: `torch.manual_seed(seed)`, then every Linear/Conv/Embedding weight (and CLIP's class
    embedding) ~ N(0, 0.15²), biases ~ N(0, 0.05²), norm weights ~ 1 + N(0, 0.2²) and norm biases
    ~ N(0, 0.1²), so that parity tests would notice a missing bias, a swapped norm or a wrong
    scale: the logits of a forward differ strongly between positions and are far from uniform.

    Args:
        path: folder to write (created if missing).
        n_layers, d_model, n_heads, n_kv_heads, d_mlp: decoder shape (`n_kv_heads` < `n_heads`
            for grouped-query attention; default `n_heads`).
        vision_layers, vision_d_model, vision_heads, image_size, patch_size: CLIP tower shape.
        vision_feature_layer, vision_feature_select_strategy, projector_hidden_act: as in
            `transformers.LlavaConfig`.
        rope_theta: rotary base.
        seed: weight seed (the tokenizer does not depend on it).

    Returns:
        `path` as a `Path`.

    Examples:
        >>> folder = build_tiny_llava("checkpoints/llava", n_kv_heads=2)
        >>> LlavaForConditionalGeneration.from_pretrained(folder).config.text_config.num_key_value_heads
        2
    """
    path = Path(path)
    tokenizer = make_tokenizer()
    n_image_tokens = (image_size // patch_size) ** 2 + (vision_feature_select_strategy == "full")
    config = LlavaConfig(
        vision_config=_clip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_decoder_config(
            "vicuna",
            tokenizer,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_mlp=d_mlp,
            rope_theta=rope_theta,
        ),
        image_token_id=tokenizer.image_token_id,
        image_seq_length=n_image_tokens,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy=vision_feature_select_strategy,
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
    )
    _save_random_model(LlavaForConditionalGeneration, config, path, seed)
    processor = LlavaProcessor(
        image_processor=make_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=vision_feature_select_strategy,
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


def build_tiny_llava_next(
    path: str | Path,
    *,
    family: str = "vicuna",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    image_grid_pinpoints: list[list[int]] | None = None,
    vision_feature_layer: int | list[int] = -2,
    rope_theta: float | None = None,
    sliding_window: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-NeXT (v1.6) checkpoint (safetensors + processor) to `path`.

    Architecture as llava-v1.6: CLIP ViT -> features of `vision_feature_layer` (CLS dropped) ->
    two-layer GELU projector, applied to the base crop and every tile; tiles are unpadded for
    the image's aspect ratio and each row of the tile grid ends with the learned
    `image_newline` embedding; the decoder of `family`:

    - ``"vicuna"`` (llava-v1.6-vicuna): Llama decoder, rotary base 10^4, Vicuna tokenizer.
    - ``"mistral"`` (llava-v1.6-mistral): Mistral decoder, rotary base 10^6, `sliding_window`
      (None as in Mistral-7B-v0.2), Mistral tokenizer.
    - ``"llama3"`` (llama3-llava-next-8b): Llama decoder, rotary base 5·10^5, Llama-3 tokenizer
      (EOS ``<|eot_id|>``).

    Defaults are llava-v1.6 at 1/12 scale: 28 px crops of 7 px patches (4 x 4 = 16 base tokens),
    `TINY_GRID_PINPOINTS` tile grids, so one image gives 16 + up to 8 x 9 = 88 image tokens.
    Weights are drawn as in `build_tiny_llava`, `image_newline` included.

    Args:
        path: folder to write (created if missing).
        family: "vicuna", "mistral" or "llama3" (see `FAMILIES`).
        n_layers, d_model, n_heads, n_kv_heads, d_mlp: decoder shape (`n_kv_heads` < `n_heads`
            for grouped-query attention; default `n_heads`).
        vision_layers, vision_d_model, vision_heads, image_size, patch_size: CLIP tower shape.
        image_grid_pinpoints: canvas sizes ``[height, width]``, multiples of `image_size`
            (default: llava-v1.6's grids at `image_size` per tile).
        vision_feature_layer: as in `transformers.LlavaNextConfig`.
        rope_theta: rotary base (default: the family's).
        sliding_window: Mistral's attention window (``"mistral"`` only).
        seed: weight seed (the tokenizer does not depend on it).

    Returns:
        `path` as a `Path`.

    Examples:
        >>> folder = build_tiny_llava_next("checkpoints/next", family="mistral", n_kv_heads=2)
        >>> LlavaNextForConditionalGeneration.from_pretrained(folder).config.text_config.model_type
        'mistral'
    """
    path = Path(path)
    tokenizer = make_tokenizer(family)
    pinpoints = image_grid_pinpoints or _scaled_pinpoints(image_size)
    config = LlavaNextConfig(
        vision_config=_clip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_decoder_config(
            family,
            tokenizer,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_mlp=d_mlp,
            rope_theta=rope_theta,
            sliding_window=sliding_window,
        ),
        image_grid_pinpoints=pinpoints,
        image_token_id=tokenizer.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
    )
    _save_random_model(LlavaNextForConditionalGeneration, config, path, seed)
    processor = LlavaNextProcessor(
        image_processor=make_anyres_image_processor(image_size, pinpoints),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path


_FAMILY_ROPE_THETA = {"vicuna": 10000.0, "mistral": 1e6, "llama3": 500000.0}


def _clip_config(
    n_layers: int, d_model: int, n_heads: int, image_size: int, patch_size: int
) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=d_model,
        intermediate_size=4 * d_model,
        projection_dim=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _decoder_config(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None,
    d_mlp: int,
    rope_theta: float | None,
    sliding_window: int | None = None,
) -> LlamaConfig | MistralConfig:
    """The decoder config of `family` (Mistral for "mistral", Llama otherwise)."""
    _check_family(family)
    if sliding_window is not None and family != "mistral":
        raise ValueError(f"sliding_window is a Mistral setting; family {family!r} has none")
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": rope_theta or _FAMILY_ROPE_THETA[family],
        },
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if family == "mistral":
        return MistralConfig(**shape, sliding_window=sliding_window)
    return LlamaConfig(**shape)


def build_tiny_llava_interleave(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-Interleave checkpoint (``llava-interleave-qwen-*-hf``):
    model type ``llava`` with a SigLIP tower (no class token; every token, last layer,
    ``vision_feature_select_strategy="full"``), the two-layer GELU projector and a Qwen2 decoder
    (biases on the query, key and value projections, grouped-query attention, rotary base 10^6,
    tied embeddings as in the 0.5B model). The tokenizer is the SentencePiece-style one with
    ChatML's ``<|im_start|>`` and ``<|im_end|>`` (the conversation the checkpoints use); the
    image processor squashes to ``image_size`` with SigLIP's 0.5 mean and std.

    Examples:
        >>> folder = build_tiny_llava_interleave("checkpoints/interleave")
        >>> type(mmlens.from_pretrained(folder)).__name__, mmlens.from_pretrained(folder).cfg.qkv_bias
        ('HookedLlava', True)
    """
    from transformers import SiglipImageProcessor

    path = Path(path)
    tokenizer = _chatml_tokenizer()
    config = LlavaConfig(
        vision_config=_siglip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_qwen2_config(
            tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, tie_word_embeddings
        ),
        image_token_id=tokenizer.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=tie_word_embeddings,
    )
    _save_random_model(LlavaForConditionalGeneration, config, path, seed)
    image_processor = SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, resample=PILImageResampling.BICUBIC,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    )
    processor.save_pretrained(path)
    return path


def build_tiny_llava_onevision(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    max_tiles: int = 3,
    vision_aspect_ratio: str = "anyres_max_2",
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-OneVision checkpoint (``llava-onevision-qwen2-*-ov-hf``
    layout): model type ``llava_onevision``, a SigLIP tower read in full at its last layer, the
    two-layer GELU projector, `image_newline`, a Qwen2 decoder, and the processor files as the
    hub publishes them (``preprocessor_config.json`` of a ``LlavaOnevisionImageProcessor``,
    ``processor_config.json`` with ``vision_aspect_ratio``, the ChatML tokenizer with
    ``<image>`` and ``<video>``).

    The released models tile on every grid from 1 x 1 to 6 x 6 tiles of 384 px and downsample
    above nine tiles' worth of patches (``anyres_max_9``); here grids up to `max_tiles` a side of
    `image_size` px, downsampled above ``anyres_max_2``, so that small test images exercise the
    downsampling: one image gives 16 base tokens and at most 12 x 13 tile tokens.

    Examples:
        >>> folder = build_tiny_llava_onevision("checkpoints/onevision")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedLlavaOnevision'
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    path = Path(path)
    tokenizer = _chatml_tokenizer(extra=["<video>"])
    pinpoints = [
        [image_size * rows, image_size * cols]
        for rows in range(1, max_tiles + 1)
        for cols in range(1, max_tiles + 1)
    ]
    config = LlavaOnevisionConfig(
        vision_config=_siglip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_qwen2_config(
            tokenizer, n_layers, d_model, n_heads, n_kv_heads, d_mlp, tie_word_embeddings
        ),
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio=vision_aspect_ratio,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=tie_word_embeddings,
    )
    _save_random_model(LlavaOnevisionForConditionalGeneration, config, path, seed)
    tokenizer.save_pretrained(path)
    image_settings = {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
        "do_resize": True, "image_grid_pinpoints": pinpoints, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "LlavaOnevisionImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "LlavaOnevisionProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size},
    }  # fmt: skip
    processor_settings = {
        "image_token": "<image>", "num_image_tokens": (image_size // patch_size) ** 2,
        "processor_class": "LlavaOnevisionProcessor", "video_token": "<video>",
        "vision_aspect_ratio": vision_aspect_ratio, "vision_feature_select_strategy": "full",
    }  # fmt: skip
    for name, settings in [
        ("preprocessor_config.json", image_settings),
        ("processor_config.json", processor_settings),
    ]:
        (path / name).write_text(json.dumps(settings, indent=2) + "\n")
    return path


def _chatml_tokenizer(extra: list[str] = ()) -> PreTrainedTokenizerFast:
    """The SentencePiece-style test tokenizer with ChatML's turn markers (and `extra` tokens)."""
    tokenizer = make_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *extra]}
    )
    return tokenizer


def _siglip_config(n_layers: int, d_model: int, n_heads: int, image_size: int, patch_size: int):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, image_size=image_size, patch_size=patch_size,
        hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )  # fmt: skip


def _qwen2_config(
    tokenizer: PreTrainedTokenizerFast,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_mlp: int,
    tie_word_embeddings: bool,
):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
        num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads, max_position_embeddings=512, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_sliding_window=False, sliding_window=64,
    )  # fmt: skip


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


def build_tiny_instructblip(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    qformer_layers: int = 2,
    qformer_d_model: int = 32,
    qformer_heads: int = 4,
    num_query_tokens: int = 8,
    seed: int = 0,
) -> Path:
    """Write a random InstructBLIP checkpoint (``Salesforce/instructblip-vicuna-*`` layout as
    transformers saves it): BLIP-2's ViT (class token, fused query/key/value with query and value
    biases, post-layernorm), the Q-Former (BERT blocks, cross-attention every second block,
    `num_query_tokens` queries; the real ones have 32 over 12 blocks), the linear language
    projection and a Vicuna-style Llama decoder; the processor files with the Q-Former's BERT
    tokenizer in ``qformer_tokenizer/`` and ``<image>`` in the decoder's tokenizer.

    Examples:
        >>> folder = build_tiny_instructblip("checkpoints/instructblip")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedInstructBlip'
    """
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    path = Path(path)
    tokenizer = make_tokenizer()
    qformer_tokenizer = make_bert_tokenizer()
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            hidden_size=vision_d_model, intermediate_size=4 * vision_d_model,
            num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
            image_size=image_size, patch_size=patch_size,
        ).to_dict(),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=len(qformer_tokenizer), hidden_size=qformer_d_model,
            num_hidden_layers=qformer_layers, num_attention_heads=qformer_heads,
            intermediate_size=4 * qformer_d_model, max_position_embeddings=128,
            pad_token_id=qformer_tokenizer.pad_token_id,
        ).to_dict(),
        text_config=_decoder_config(
            "vicuna", tokenizer, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
            n_kv_heads=None, d_mlp=d_mlp, rope_theta=None,
        ).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.image_token_id,
    )  # fmt: skip
    _save_random_model(InstructBlipForConditionalGeneration, config, path, seed)
    processor = InstructBlipProcessor(
        image_processor=BlipImageProcessorPil(
            size={"height": image_size, "width": image_size}, **_CLIP_PIXELS
        ),
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )
    processor.save_pretrained(path)
    return path


def _save_random_model(model_class: type, config: Any, path: Path, seed: int) -> None:
    """Build `model_class(config)` with weights drawn from `seed` (see `build_tiny_llava`), save it."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    _randomize_weights(model)
    model.save_pretrained(path)


@torch.no_grad()
def _randomize_weights(model: torch.nn.Module) -> None:
    """Non-trivial random weights (see `build_tiny_llava`), drawn from the global torch RNG."""
    for name, parameter in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rsplit(".", 2)[-2] if "." in name else ""
        is_norm = "norm" in owner.lower()  # BERT's (the Q-Former's) are "LayerNorm"
        if is_norm and leaf == "weight":
            parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
        elif is_norm and leaf == "bias":
            parameter.normal_(0.0, 0.1)
        elif leaf == "bias":
            parameter.normal_(0.0, 0.05)
        else:
            parameter.normal_(0.0, 0.15)


def hf_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each item's first real token, as HF `generate` computes them
    (a plain HF forward would count from the padded start)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def hf_image_features(output: Any) -> torch.Tensor:
    """The projected image features of an HF LLaVA forward output, `[n_image_tokens, d_model]`
    (LLaVA-NeXT: packed, newline tokens included), whatever the transformers version.

    transformers < 5.2x returns them as the tensor `image_hidden_states`; 5.2x keeps them in
    `image_outputs.pooler_output`, one tensor per image (and deprecates `image_hidden_states`,
    which returns that list).

    Examples:
        >>> from transformers import LlavaForConditionalGeneration
        >>> hf = LlavaForConditionalGeneration.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
        >>> with torch.no_grad():
        ...     features = hf_image_features(hf(**inp.model_kwargs()))
        >>> features.shape                              # [n_image_tokens, d_model]
        torch.Size([64, 128])
    """
    image_outputs = getattr(output, "image_outputs", None)
    features = (
        image_outputs.pooler_output if image_outputs is not None else output.image_hidden_states
    )
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def hf_answer_gradients(
    hf_model: torch.nn.Module, kwargs: dict, modules: list[torch.nn.Module], n_prompt: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Grad-CAM's ingredients through a Hugging Face model, independently of mmlens: the
    outputs of `modules` (in the order they run) in one forward pass on `kwargs` (a batch-1
    prompt of `n_prompt` tokens followed by a teacher-forced answer) and the gradients of the
    summed logits of the answer's tokens with respect to them.

    Examples:
        >>> from transformers import LlavaForConditionalGeneration
        >>> hf = LlavaForConditionalGeneration.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
        >>> forced = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, "red"))
        >>> norm = hf.model.language_model.layers[0].post_attention_layernorm
        >>> outputs, gradients = hf_answer_gradients(hf, forced.model_kwargs(), [norm], inp.input_ids.shape[1])
        >>> outputs[0].shape == gradients[0].shape == forced.input_ids.shape + (128,)
        True
    """
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in modules]
    try:
        logits = hf_model(**kwargs).logits
    finally:
        for handle in handles:
            handle.remove()
    answer = kwargs["input_ids"][0, n_prompt:]
    target = logits[0, n_prompt - 1 + torch.arange(len(answer)), answer].sum()
    return outputs, list(torch.autograd.grad(target, outputs))


def assert_matches_hf(
    hf_model: torch.nn.Module, model: torch.nn.Module, inp: Any, tolerance: float = 1e-4
) -> tuple:
    """Assert that mmlens and HF agree on `inp` at every real position: logits, every layer's
    residual stream, and the final normed state. Returns HF's output and mmlens' cache so that a
    test can check more.

    Examples:
        >>> from transformers import LlavaForConditionalGeneration
        >>> hf = LlavaForConditionalGeneration.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
        >>> out, cache = assert_matches_hf(hf, model, model.prepare([image, image], ["Why?", "Is it red?"]))
    """
    with torch.no_grad():
        out = hf_model(
            **inp.model_kwargs(),
            position_ids=hf_position_ids(inp.attention_mask),
            output_hidden_states=True,
        )
        logits, cache = model.run_with_cache(inp)
    real = inp.attention_mask.bool()
    assert (out.logits - logits)[real].abs().max() < tolerance, "logits"
    # InstructBLIP keeps its language model's states apart from the vision and Q-Former outputs.
    hidden_states = getattr(out, "hidden_states", None) or out.language_model_outputs.hidden_states
    for layer in range(model.cfg.n_layers):
        resid_pre = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (hidden_states[layer] - resid_pre)[real].abs().max() < tolerance, f"layer {layer}"
    final = cache["ln_final.hook_normalized"]  # HF's last hidden state is after the final norm
    assert (hidden_states[-1] - final)[real].abs().max() < tolerance, "final norm"
    assert logits.std() > 0.5, "random checkpoint too flat for parity to mean anything"
    return out, cache
