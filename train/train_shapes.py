"""Train the shipped ``tiny-shapes`` LLaVA from scratch on `mmlens.zoo.shapes`.

    python -m train.train_shapes                       # writes mmlens/zoo/tiny-shapes/
    python -m train.train_shapes --out /tmp/ts --steps 200   # a quick try elsewhere
    python -m train.train_shapes --routed              # mmlens/zoo/tiny-shapes-routed/ (`ROUTED`)

The model is a llava-hf `LlavaForConditionalGeneration`: a CLIP vision tower (112 px images,
14 px patches -> 8 x 8 = 64 image tokens), llava-1.5's two-layer GELU projector and a 6-layer
Llama decoder, with a word-level tokenizer (`make_tokenizer`) and llava-1.5's image processor
(`mmlens.testing.make_image_processor`). Every training prompt is the single-turn LLaVA-1.5
conversation with its system prompt, exactly what `model.prepare(image, question)` renders, and
the loss is the cross-entropy of the answer word and ``</s>`` after "ASSISTANT:" (the third
cycle adds a language-modelling loss on the question text). Each image gets several independent
questions (its own plus follow-ups from `mmlens.zoo.shapes.conversation`); the prompt prefix
they share (system text and image tokens) runs once per image (`shared_prefix_loss`), which
gives the same loss and gradients as separate prompts at a fraction of the cost.

First the vision tower alone is pretrained on dense per-patch labels from the generator
(`pretrain_vision`, 1500 steps: the stand-in for the CLIP weights a real LLaVA starts from).
Then, with the tower frozen as in LLaVA, three cycles that continue one image stream: 3400 steps
(lr 5e-4), a warm restart of 1200 steps (fresh AdamW, lr 3e-4, cosine again), and a 1500-step
focus cycle (fresh AdamW, lr 3e-4) on scenes of 2-4 objects whose follow-ups are mostly ChooseRel
and LogicalObj, with colour-swapped twins of the LogicalObj questions (same words, other answer;
`mmlens.zoo.shapes.conversation`), a language-modelling loss on the questions
(`shared_prefix_loss`) and colour binding lures ("a green star" where the star is red and the
circle green; `mmlens.zoo.shapes.ask`). Follow-up questions are drawn more often from the types
that need two objects throughout (`DEFAULTS`). ``--resume FOLDER [--resume-cycle 3]`` starts at
the second (third) cycle from a saved folder. About 37 minutes with the default 2 threads on a
2-core machine.

Training images are drawn fresh from the generator (dataset seed ``seed + 1000``, never an
evaluation seed): no epochs, no fixed training set. Everything is seeded: the same command with
the same thread count on the same torch build and CPU type gives the same weights. At the end the
script prints the accuracy table of `train/evaluate.py` on held-out samples (dataset seed 7),
loading the saved folder through `mmlens.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import einops
import numpy as np
import torch
from jaxtyping import Float
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

import mmlens.zoo
from mmlens.inputs.templates import IMAGE_PLACEHOLDER, render
from mmlens.testing import make_image_processor
from mmlens.zoo.shapes import (
    COLORS,
    IMAGE_SIZE,
    MARGIN,
    PATCH,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    TEMPLATE,
    ShapesSample,
    Turn,
    conversation,
    generate,
    vocabulary,
)

DEFAULT_OUT = Path(mmlens.zoo.__file__).parent / "tiny-shapes"

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
"""Ids 0, 1, 2 as in Llama; ``<image>`` and ``<pad>`` come after the words."""

DEFAULTS = dict(
    steps=3400,
    batch_size=8,
    n_questions=12,
    lr=5e-4,
    restart_steps=1200,
    restart_lr=3e-4,
    extra_follow_ups="ChooseRel,ChooseRel,LogicalObj,LogicalObj,LogicalObj,QueryAttr",
    focus_steps=1500,
    focus_lr=3e-4,
    focus_follow_ups="ChooseRel,ChooseRel,ChooseRel," + ",".join(["LogicalObj"] * 6),
    focus_objects=(2, 3, 4),
    focus_color_lures=0.75,
    focus_swapped_twins=1.0,
    focus_question_weight=0.3,
    vision_steps=1500,
    freeze_vision=True,
    threads=2,
)
"""Training settings of the shipped checkpoint (`train`'s defaults, the CLI's defaults)."""

ROUTED = dict(
    source=DEFAULT_OUT,
    out=DEFAULT_OUT.parent / "tiny-shapes-routed",
    mask_steps=1500,
    mask_lr=3e-4,
    mask_follow_ups="ChooseRel,ChooseRel,LogicalObj,LogicalObj,LogicalObj,QueryAttr,QueryAttr",
    penalty_steps=1000,
    penalty_lr=3e-4,
    penalty_follow_ups=DEFAULTS["extra_follow_ups"],
    routing_weight=5.0,
)
"""Settings of `tiny-shapes-routed` (``--routed``): two cycles on top of the trained tiny-shapes.

1. ``mask_steps`` with the image masked out of the assistant rows' attention ("ASSISTANT", ":"
   and the answer) and the answer probe on the question's last token (`shared_prefix_loss`): the
   model must move what it read from the image at the last position into the question tokens.
2. ``penalty_steps`` without the mask, the assistant rows' attention to the image penalised
   (`routing_weight`): the model learns to put no attention there, so that inference, where
   nothing is masked, matches training.

Why not from scratch: trained from random weights with the penalty alone, the question tokens
learned colour and shape but never the objects' positions (a linear probe of the x-centre at the
question tokens stayed at chance), and "left of" / "which part" stayed at chance; docs/zoo.md."""

ARCHITECTURE = dict(
    d_model=128,
    n_layers=6,
    n_heads=4,
    d_mlp=384,
    vision_d_model=96,
    vision_layers=3,
    vision_heads=4,
    patch_size=14,
)
"""Shape of the shipped model."""


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The word-level tokenizer of tiny-shapes.

    A `tokenizers` WordLevel model over `mmlens.zoo.shapes.vocabulary` (every word of the system
    prompt, the templates and the answers), split by the `Whitespace` pre-tokenizer (runs of
    ``\\w`` characters and runs of punctuation, so "ASSISTANT:" is "ASSISTANT" ":"), ``<s>``
    prepended, character offsets exact. ``<image>`` and ``<pad>`` are special added tokens;
    ``<image>`` is registered as the processor's image token. Unknown words map to ``<unk>``.

    Example:
        >>> tokenizer = make_tokenizer()
        >>> tokenizer.convert_ids_to_tokens(tokenizer("Is the circle red?").input_ids)
        ['<s>', 'Is', 'the', 'circle', 'red', '?']
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in vocabulary():
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in [*SPECIAL_TOKENS, IMAGE_PLACEHOLDER, "<pad>"]
        ]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        model_max_length=512,
    )


def make_processor() -> LlavaProcessor:
    """llava-1.5's processor at 112 px with the word-level tokenizer."""
    return LlavaProcessor(
        image_processor=make_image_processor(IMAGE_SIZE),
        tokenizer=make_tokenizer(),
        patch_size=ARCHITECTURE["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def make_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    """The `LlavaConfig` of tiny-shapes (`ARCHITECTURE`)."""
    arch = ARCHITECTURE
    vision = CLIPVisionConfig(
        hidden_size=arch["vision_d_model"],
        intermediate_size=4 * arch["vision_d_model"],
        projection_dim=arch["vision_d_model"],
        num_hidden_layers=arch["vision_layers"],
        num_attention_heads=arch["vision_heads"],
        image_size=IMAGE_SIZE,
        patch_size=arch["patch_size"],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arch["d_model"],
        intermediate_size=arch["d_mlp"],
        num_hidden_layers=arch["n_layers"],
        num_attention_heads=arch["n_heads"],
        num_key_value_heads=arch["n_heads"],
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    n_image_tokens = (IMAGE_SIZE // arch["patch_size"]) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        image_seq_length=n_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


def collate(
    processor: LlavaProcessor,
    samples: list[ShapesSample],
    *,
    with_answers: bool = True,
    padding_side: str = "left",
) -> dict[str, torch.Tensor]:
    """Model inputs for `samples`.

    Each item is the LLaVA-1.5 prompt exactly as `model.prepare(image, question)` renders and
    tokenizes it, followed (when `with_answers`) by the answer word and ``</s>``; ``labels`` are
    -100 everywhere but those two tokens. Padded on `padding_side`;
    ``position_ids`` count from each item's first real token.
    """
    tokenizer = processor.tokenizer
    texts = [
        render(TEMPLATE, sample.question, n_images=1, image_token=processor.image_token).text
        for sample in samples
    ]
    encoded = processor(images=[sample.image for sample in samples], text=texts, padding=False)
    rows, label_rows = [], []
    for ids, sample in zip(encoded["input_ids"], samples, strict=True):
        ids, labels = list(ids), [-100] * len(ids)
        if with_answers:
            answer = tokenizer.convert_tokens_to_ids(sample.answer)
            if answer == tokenizer.unk_token_id:
                raise ValueError(f"answer {sample.answer!r} is not in the vocabulary")
            ids += [answer, tokenizer.eos_token_id]
            labels += [answer, tokenizer.eos_token_id]
        rows.append(ids)
        label_rows.append(labels)
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (ids, item_labels) in enumerate(zip(rows, label_rows, strict=True)):
        span = slice(length - len(ids), length) if padding_side == "left" else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        labels[row, span] = torch.tensor(item_labels)
        attention_mask[row, span] = 1
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "pixel_values": torch.from_numpy(np.stack(encoded["pixel_values"])),
    }
    if with_answers:
        batch["labels"] = labels
    return batch


def answer_ids(processor: LlavaProcessor, samples: list[ShapesSample]) -> torch.Tensor:
    """The token id of each sample's answer word."""
    return torch.tensor(
        [processor.tokenizer.convert_tokens_to_ids(sample.answer) for sample in samples]
    )


@torch.no_grad()
def hf_accuracy(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: list[ShapesSample],
    batch_size: int = 64,
) -> dict[str, float]:
    """Greedy first-token accuracy per question type, through the HF model (for training logs)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collate(processor, chunk, with_answers=False)
        batch = {key: value.to(device) for key, value in batch.items()}
        logits = model(**batch, logits_to_keep=1).logits[:, -1]
        hits = (logits.argmax(-1).cpu() == answer_ids(processor, chunk)).tolist()
        for sample, hit in zip(chunk, hits, strict=True):
            correct.setdefault(sample.question_type, []).append(hit)
    model.train(was_training)
    return {kind: sum(hits) / len(hits) for kind, hits in correct.items()}


def shared_prefix_loss(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: list[ShapesSample],
    conversations: list[list[Turn]],
    question_weight: float = 0.0,
    routing_weight: float = 0.0,
    answer_probe: torch.nn.Linear | None = None,
    mask_image: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of the answer words and ``</s>`` of single-turn questions about each
    image (``conversations[i]`` about ``samples[i].image``, e.g. from
    `mmlens.zoo.shapes.conversation`), computed with the image's prompt prefix run once; plus
    `question_weight` times the mean next-token cross-entropy of the prompt text between the
    image and the answer (the question and "ASSISTANT:", from its second token on), the
    language modelling a real LLaVA's decoder had before it saw images; plus `routing_weight`
    times the attention that the assistant tokens ("ASSISTANT", ":", the answer; ":" is the last
    prompt position) pay to image tokens, summed over the image and averaged over rows, heads and
    layers (`tiny-shapes-routed`: image information must reach the answer through the question
    tokens; needs eager attention, which returns the weights); plus, with `answer_probe`, the
    cross-entropy of that linear head's prediction of the answer word from the residual stream of
    the question's last token ("?") entering the second-to-last layer (deep supervision that
    makes the question tokens gather what the answer needs; the head is not part of the model);
    with `mask_image`, the image keys are masked out of the assistant rows' attention in every
    layer (a 4-D attention mask, which the model uses as given).

    Every question is the single-turn LLaVA-1.5 prompt that `model.prepare` renders,
    ``{system} USER: <image>\n{question} ASSISTANT: {answer}</s>``. Its prefix up to the last
    image token is the same for all questions about one image, so it runs once per image
    (vision tower, projector and decoder, with its key/value cache); the cache is repeated for the
    questions, which run as one batch on top of it. Causal attention makes this exactly the loss of
    the separate full prompts (`test_zoo` checks it), at a fraction of the cost.
    """
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    rendered = render(TEMPLATE, "?", n_images=1, image_token=processor.image_token)
    prefix_end = rendered.image_spans[0][1]
    prefix = processor(
        images=[sample.image for sample in samples],
        text=[rendered.text[:prefix_end]] * len(samples),
        return_tensors="pt",
    )
    prefix_ids = prefix["input_ids"].to(device)
    out = model(
        input_ids=prefix_ids,
        pixel_values=prefix["pixel_values"].to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    repeats = [len(turns) for turns in conversations]
    cache = out.past_key_values
    for layer in cache.layers:
        layer.keys = _repeat_per_image(layer.keys, repeats)
        layer.values = _repeat_per_image(layer.values, repeats)

    rows = []
    for turns in conversations:
        for turn in turns:
            text = render(TEMPLATE, turn.question, n_images=1, image_token=processor.image_token)
            suffix = f"{text.text[prefix_end:]} {turn.answer}{tokenizer.eos_token}"
            rows.append(tokenizer(suffix, add_special_tokens=False)["input_ids"])
    length = max(map(len, rows))
    suffix_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    question_labels = labels.clone()
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, ids in enumerate(rows):
        suffix_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(ids) - 2 : len(ids)] = torch.tensor(ids[-2:])
        question_labels[row, 1 : len(ids) - 2] = torch.tensor(ids[1:-2])
        mask[row, : len(ids)] = 1
    n_prefix = prefix_ids.shape[1]
    attention_mask = torch.cat([torch.ones((len(rows), n_prefix), dtype=torch.long), mask], dim=1)
    position_ids = n_prefix + torch.arange(length).expand(len(rows), length)
    # Rows of "ASSISTANT", ":" and the answer: the last 2 + len(" ASSISTANT:") real tokens.
    n_assistant = len(tokenizer(" ASSISTANT:", add_special_tokens=False)["input_ids"])
    assistant = torch.zeros((len(rows), length), dtype=torch.bool)
    for row, ids in enumerate(rows):
        assistant[row, len(ids) - 2 - n_assistant : len(ids) - 1] = True
    is_image = _repeat_per_image(prefix_ids == processor.image_token_id, repeats)
    if mask_image:
        # [row, 1, query, key]: causal over the suffix, padding out, and no image key for the
        # assistant rows (a 4-D mask is used as given).
        allowed = torch.cat(
            [
                (~(assistant[:, :, None] & is_image.cpu()[:, None, :])),
                torch.ones(length, length, dtype=torch.bool).tril().expand(len(rows), -1, -1)
                & mask.bool()[:, None, :],
            ],
            dim=2,
        )
        attention_mask = torch.zeros(allowed.shape, dtype=torch.float32)
        attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(torch.float32).min)
        attention_mask = attention_mask[:, None]
    out = model(
        input_ids=suffix_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=position_ids.to(device),
        past_key_values=cache,
        labels=labels.to(device),
        output_attentions=bool(routing_weight),
        output_hidden_states=answer_probe is not None,
    )
    loss = out.loss
    if question_weight:
        question_loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), question_labels[:, 1:].flatten().to(device)
        )
        loss = loss + question_weight * question_loss
    if answer_probe is not None:
        # The question's last token comes before " ASSISTANT:", the answer and "</s>".
        question_end = torch.tensor([len(ids) - 3 - n_assistant for ids in rows], device=device)
        hidden = out.hidden_states[model.config.text_config.num_hidden_layers - 1]
        probed = answer_probe(hidden[torch.arange(len(rows), device=device), question_end])
        answers = torch.tensor([ids[-2] for ids in rows], device=device)
        loss = loss + torch.nn.functional.cross_entropy(probed, answers)
    if routing_weight:
        on_image = torch.stack(
            [
                pattern[..., :n_prefix].mul(is_image[:, None, None]).sum(-1)
                for pattern in out.attentions
            ]
        )  # [layer, row, head, query]: attention mass on image keys
        loss = loss + routing_weight * on_image.mean(2)[:, assistant.to(device)].mean()
    return loss


def _repeat_per_image(
    tensor: Float[torch.Tensor, "image ..."], repeats: list[int]
) -> Float[torch.Tensor, "question ..."]:
    """Row i of `tensor` `repeats[i]` times. A scene may support fewer distinct questions than
    asked for, hence the general case; when every image has the same count (nearly always) it is
    an expand, whose backward pass is a sum instead of `repeat_interleave`'s scatter-add
    (`bench/train_step.py`: 0.84x the time of loss and backward on one CPU thread)."""
    if len(set(repeats)) == 1:
        return einops.repeat(tensor, "image ... -> (image question) ...", question=repeats[0])
    return tensor.repeat_interleave(torch.tensor(repeats, device=tensor.device), dim=0)


def sincos_positions(n_side: int, dim: int) -> Float[torch.Tensor, "n_side*n_side dim"]:
    """2-D sine-cosine position codes of an ``n_side x n_side`` patch grid, row-major (MAE's):
    the first half of the features encodes the column, the second the row, each as
    ``sin``/``cos`` of the coordinate times ``10000 ** (-k / (dim / 4))``; every code has norm
    ``sqrt(dim / 2)``.

    Example:
        >>> sincos_positions(8, 96).shape
        torch.Size([64, 96])
    """
    quarter = dim // 4
    frequencies = 10000.0 ** (-torch.arange(quarter) / quarter)
    rows, columns = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    codes = []
    for coordinate in (columns.flatten(), rows.flatten()):
        angles = torch.outer(coordinate.float(), frequencies)
        codes += [angles.sin(), angles.cos()]
    return torch.cat(codes, dim=1)


def build_model(seed: int = 0, init_std: float = 0.08) -> LlavaForConditionalGeneration:
    """The untrained tiny-shapes model: `make_config` with decoder/projector weights ~ N(0, init_std²)
    (1/sqrt(d_model) here: Llama's 0.02 trains far slower at this width), CLIP's own init except
    for the vision tower's position embeddings, which start as `sincos_positions` (zero for the
    class token).

    Why: CLIP draws them from N(0, 0.02²), about 1% of the norm of a patch's content embedding;
    trained from there, the image features carried no patch position at all (a linear probe of an
    object's column from its features was at chance), so no "left of"/"which part" question could
    be answered. Sine-cosine codes have the content's scale from the first step.
    """
    processor_tokenizer = make_tokenizer()
    config = make_config(processor_tokenizer)
    config.initializer_range = init_std
    config.text_config.initializer_range = init_std
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    positions = model.model.vision_tower.embeddings.position_embedding.weight
    n_side = config.vision_config.image_size // config.vision_config.patch_size
    with torch.no_grad():
        positions[0] = 0.0
        positions[1:] = sincos_positions(n_side, positions.shape[1])
    return model


def patch_targets(samples: list[ShapesSample]) -> dict[str, torch.Tensor]:
    """Per-patch ground truth of `pretrain_vision` (8 x 8 patches, row-major).

    Returns:
        ``shape``, ``color``, ``size``: ``[n, 64]`` class ids of the object whose cell holds the
        patch (1 + its index in `SHAPES` / `COLORS` / `SIZES`), 0 on background patches.
        ``center``: ``[n, 64, 2]`` that object's box centre (x, y) in patch units from the image
        centre (0 on background patches).
    """
    n_side = IMAGE_SIZE // PATCH
    grid = torch.zeros(len(samples), n_side, n_side, dtype=torch.long)
    shape, color, size = grid.clone(), grid.clone(), grid.clone()
    center = torch.zeros(len(samples), n_side, n_side, 2)
    for index, sample in enumerate(samples):
        for obj in sample.objects:
            x0, y0, x1, y1 = obj.footprint
            cell = (
                index,
                slice((y0 - MARGIN) // PATCH, (y1 + MARGIN) // PATCH),
                slice((x0 - MARGIN) // PATCH, (x1 + MARGIN) // PATCH),
            )
            shape[cell] = SHAPES.index(obj.shape) + 1
            color[cell] = list(COLORS).index(obj.color) + 1
            size[cell] = list(SIZES).index(obj.size) + 1
            center[cell] = torch.tensor(obj.center) / PATCH - n_side / 2
    return {
        "shape": shape.flatten(1),
        "color": color.flatten(1),
        "size": size.flatten(1),
        "center": center.flatten(1, 2),
    }


def warmup_cosine(warmup: int, steps: int, floor: float = 0.05):
    """The learning-rate factor of both training stages, as a function of the step: linear
    warm-up over `warmup` steps, then cosine decay to `floor` at `steps`.

    Example:
        >>> factor = warmup_cosine(100, 1000)
        >>> factor(0), factor(99), round(factor(999), 3)
        (0.01, 1.0, 0.05)
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def pretrain_vision(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    *,
    steps: int,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 1e-3,
    log=print,
) -> dict[str, float]:
    """Pretrain the vision tower alone on dense per-patch labels (the stand-in for CLIP's
    pretraining, which a real LLaVA starts from).

    Linear heads on the features LLaVA reads (the last layer's patch tokens) predict, for every
    patch, the shape, colour and size of the object whose cell holds it and that object's centre
    (`patch_targets`), and the patch's own grid position; cross-entropy plus squared error, AdamW
    with warm-up and cosine decay. The heads are dropped afterwards: only the tower's weights
    change. Images come from `generate(..., seed=seed + 3000)`.

    Why: trained end to end through the decoder only, the tower learned colour and shape but kept
    little position and mixed the rest, and the positional types ("left of", "which part") stayed at
    chance. Returns the final batch's per-patch accuracy on object patches (``shape``, ``color``,
    ``size``) and the mean absolute centre error in patches (``center_error``).
    """
    tower = model.model.vision_tower
    width = tower.config.hidden_size
    n_side = IMAGE_SIZE // PATCH
    heads = torch.nn.ModuleDict(
        {
            "shape": torch.nn.Linear(width, len(SHAPES) + 1),
            "color": torch.nn.Linear(width, len(COLORS) + 1),
            "size": torch.nn.Linear(width, len(SIZES) + 1),
            "center": torch.nn.Linear(width, 2),
            "position": torch.nn.Linear(width, 2),
        }
    )
    rows, columns = torch.meshgrid(torch.arange(n_side), torch.arange(n_side), indexing="ij")
    patch_position = torch.stack([columns.flatten(), rows.flatten()], -1) - (n_side - 1) / 2
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(50, steps), steps))
    tower.train()
    started, scores = time.time(), {}
    for step in range(steps):
        samples = generate(batch_size, seed + 3000, start=step * batch_size)
        pixel_values = torch.from_numpy(
            np.stack(processor.image_processor([s.image for s in samples])["pixel_values"])
        )
        features = tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
        target = patch_targets(samples)
        on_object = target["shape"] > 0
        predicted = {name: head(features) for name, head in heads.items()}
        loss = sum(
            torch.nn.functional.cross_entropy(predicted[name].flatten(0, 1), target[name].flatten())
            for name in ("shape", "color", "size")
        )
        loss = loss + (predicted["center"] - target["center"])[on_object].pow(2).mean()
        loss = loss + (predicted["position"] - patch_position).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % 250 == 0 or step + 1 == steps:
            with torch.no_grad():
                scores = {
                    name: (predicted[name].argmax(-1) == target[name])[on_object]
                    .float()
                    .mean()
                    .item()
                    for name in ("shape", "color", "size")
                }
                error = (predicted["center"] - target["center"])[on_object].abs().mean()
                scores["center_error"] = error.item()
            table = " ".join(f"{name}={value:.3f}" for name, value in scores.items())
            log(
                f"vision step {step + 1}/{steps} loss {loss.item():.3f} {time.time() - started:.0f}s {table}"
            )
    return scores


def train(
    *,
    out: str | Path | None = DEFAULT_OUT,
    seed: int = 0,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    n_questions: int = DEFAULTS["n_questions"],
    lr: float = DEFAULTS["lr"],
    warmup: int = 100,
    weight_decay: float = 0.05,
    init_std: float = 0.08,
    train_objects: tuple[int, ...] = (1, 2, 3, 4),
    eval_every: int = 250,
    eval_per_type: int = 40,
    threads: int | None = DEFAULTS["threads"],
    device: str = "cpu",
    resume_from: str | Path | None = None,
    first_step: int = 0,
    extra_follow_ups: tuple[str, ...] = (),
    color_lures: float = 0.0,
    swapped_twins: float = 0.0,
    question_weight: float = 0.0,
    vision_steps: int = 0,
    freeze_vision: bool = False,
    routing_weight: float = 0.0,
    answer_probe: bool = False,
    mask_image: bool = False,
    log=print,
) -> LlavaForConditionalGeneration:
    """Train tiny-shapes from scratch; save it (weights, config, tokenizer, processor) to `out`.

    Each step sees `batch_size` images with `n_questions` single-turn questions each
    (`shared_prefix_loss`); the images' own question types cycle through all types, their scenes
    hold `train_objects` objects. Images come from `generate(..., seed=seed + 1000)` in order.
    Weights start from `build_model(seed, init_std)`; AdamW with linear warm-up and cosine decay
    to 5% of `lr` (`warmup_cosine`), gradients clipped at norm 1. Logs the loss and, every
    `eval_every` steps, the single-question first-token accuracy per type on `eval_per_type`
    samples per type of dataset seed ``seed + 2000`` (through HF), and saves the model so far to
    `out`.

    `resume_from` (a folder this function saved) continues training those weights with a fresh
    optimizer and schedule (a warm restart); steps are then numbered from `first_step`, which
    picks up the image stream where the earlier run left it.
    `extra_follow_ups` adds question types to the draw of follow-up questions (a type listed once
    more is drawn twice as often); `color_lures` is `mmlens.zoo.shapes.ask`'s chance of a binding
    lure in LogicalObj follow-ups, `swapped_twins` that of a follow-up's twin with its colours
    exchanged (`mmlens.zoo.shapes.conversation`); `question_weight` weighs the language-modelling
    loss on the questions (`shared_prefix_loss`).
    `vision_steps` > 0 first runs `pretrain_vision` on the fresh model (not on a resumed one);
    `freeze_vision` keeps the vision tower's weights fixed in this cycle, as LLaVA keeps CLIP's.
    `routing_weight` > 0 penalises the assistant tokens' attention to the image
    (`shared_prefix_loss`; `tiny-shapes-routed`), computed with eager attention;
    `answer_probe` adds a fresh linear head, trained with the model and then dropped, that
    predicts the answer from the question's last token (`shared_prefix_loss`).
    `mask_image` keeps the image keys out of the assistant rows' attention (`shared_prefix_loss`;
    the first cycle of `ROUTED`).
    """
    if threads:
        torch.set_num_threads(threads)
    processor = make_processor()
    if resume_from is None:
        model = build_model(seed, init_std).to(device)
        if vision_steps:
            pretrain_vision(model, processor, steps=vision_steps, seed=seed, log=log)
    else:
        model = LlavaForConditionalGeneration.from_pretrained(resume_from)
    model = model.to(device).train()
    if routing_weight:
        model.set_attn_implementation("eager")  # the penalty needs the attention weights
    model.model.vision_tower.requires_grad_(not freeze_vision)
    probe = None
    if answer_probe:
        generator = torch.Generator().manual_seed(seed + 4000)
        config = model.config.text_config
        probe = torch.nn.Linear(config.hidden_size, config.vocab_size).to(device)
        with torch.no_grad():
            probe.weight.normal_(0.0, init_std, generator=generator)
            probe.bias.zero_()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if probe is not None:
        trained += [(f"answer_probe.{n}", p) for n, p in probe.named_parameters()]
    decay = [p for n, p in trained if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in trained if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps))
    eval_samples = generate(eval_per_type * len(QUESTION_TYPES), seed=seed + 2000)
    started, running, last = time.time(), None, first_step + steps
    for step in range(first_step, last):
        samples = generate(
            batch_size, seed + 1000, start=step * batch_size, n_objects=train_objects
        )
        follow_ups = (*QUESTION_TYPES, *extra_follow_ups)
        conversations = [
            conversation(
                sample,
                n_questions,
                follow_ups,
                color_lures=color_lures,
                swapped_twins=swapped_twins,
            )
            for sample in samples
        ]
        loss = shared_prefix_loss(
            model,
            processor,
            samples,
            conversations,
            question_weight,
            routing_weight,
            probe,
            mask_image,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % eval_every == 0 or step + 1 == last:
            accuracy = hf_accuracy(model, processor, eval_samples)
            table = " ".join(f"{kind}={value:.2f}" for kind, value in accuracy.items())
            log(f"step {step + 1}/{last} loss {running:.3f} {time.time() - started:.0f}s {table}")
            if out is not None:
                _save(model, processor, out)
        elif (step + 1) % 25 == 0:
            log(f"step {step + 1}/{last} loss {running:.3f} {time.time() - started:.0f}s")
    model.eval()
    if routing_weight:
        model.set_attn_implementation("sdpa")
    if out is not None:
        _save(model, processor, out)
    return model


def _save(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out: str | Path) -> None:
    state = model.training
    model.eval().save_pretrained(Path(out))
    processor.save_pretrained(Path(out))
    model.train(state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.train_shapes",
        description="Train the tiny-shapes LLaVA from scratch (see the module docstring).",
    )
    parser.add_argument("--out", help="checkpoint folder to write (default: the shipped folder, "
                        "mmlens/zoo/tiny-shapes or, with --routed, mmlens/zoo/tiny-shapes-routed)")  # fmt: skip
    parser.add_argument("--routed", action="store_true", help="train tiny-shapes-routed: two "
                        "cycles on top of a trained tiny-shapes (--resume, default the shipped one)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="images")
    parser.add_argument("--questions", type=int, default=DEFAULTS["n_questions"], help="per image")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--restart-steps", type=int, default=DEFAULTS["restart_steps"],
                        help="steps of the second cycle (warm restart; 0: none)")  # fmt: skip
    parser.add_argument("--restart-lr", type=float, default=DEFAULTS["restart_lr"])
    parser.add_argument("--extra-follow-ups", default=DEFAULTS["extra_follow_ups"], help="comma-separated types "
                        "drawn more often as follow-up questions (listed twice: drawn three times as often)")  # fmt: skip
    parser.add_argument("--focus-steps", type=int, default=DEFAULTS["focus_steps"],
                        help="steps of the third cycle (ChooseRel/LogicalObj focus; 0: none)")  # fmt: skip
    parser.add_argument("--focus-lr", type=float, default=DEFAULTS["focus_lr"])
    parser.add_argument("--focus-follow-ups", default=DEFAULTS["focus_follow_ups"],
                        help="--extra-follow-ups of the third cycle")  # fmt: skip
    parser.add_argument("--focus-color-lures", type=float, default=DEFAULTS["focus_color_lures"],
                        help="chance of a binding lure in the third cycle's LogicalObj follow-ups")  # fmt: skip
    parser.add_argument("--focus-swapped-twins", type=float, default=DEFAULTS["focus_swapped_twins"],
                        help="chance that a third-cycle LogicalObj follow-up gets its colour-swapped twin")  # fmt: skip
    parser.add_argument("--focus-question-weight", type=float, default=DEFAULTS["focus_question_weight"],
                        help="weight of the language-modelling loss on the questions in the third cycle")  # fmt: skip
    parser.add_argument("--vision-steps", type=int, default=DEFAULTS["vision_steps"],
                        help="steps of the vision tower's dense pretraining (0: none)")  # fmt: skip
    parser.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS["freeze_vision"],
                        help="keep the pretrained vision tower fixed while the rest trains")  # fmt: skip
    parser.add_argument(
        "--resume", help="a saved folder to continue: skip the cycles before --resume-cycle"
    )
    parser.add_argument("--resume-cycle", type=int, choices=(2, 3), default=2,
                        help="with --resume: the cycle to start at (2: restart, 3: focus)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch CPU threads (the "
                        "shipped weights were trained with 2; another count gives other weights)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-per-type", type=int, default=200, help="final evaluation size")
    args = parser.parse_args(argv)
    args.out = args.out or str(ROUTED["out"] if args.routed else DEFAULT_OUT)
    started = time.time()
    common = dict(
        out=args.out,
        seed=args.seed,
        batch_size=args.batch_size,
        n_questions=args.questions,
        freeze_vision=args.freeze_vision,
        threads=args.threads,
        device=args.device,
    )
    if args.routed:
        train_routed(args.resume or ROUTED["source"], **common)
    else:
        train_cycles(args, common)
    seconds = time.time() - started
    print(f"trained in {seconds / 60:.1f} min ({args.threads} thread(s)); saved to {args.out}")

    import mmlens
    from train.evaluate import evaluate

    model = mmlens.from_pretrained(args.out)
    model.default_template = TEMPLATE
    samples = generate(args.eval_per_type * len(QUESTION_TYPES), seed=7)
    result = evaluate(model, samples)
    print(f"\nheld-out accuracy (dataset seed 7, {len(samples)} samples):\n")
    print(result.accuracy_table())
    print("\nlast-position attention over the image vs the question's boxes:\n")
    print(result.attention_table())
    print(json.dumps({"train_seconds": round(seconds), "accuracy": result.accuracy}))


def train_routed(source: str | Path, **common) -> None:
    """`tiny-shapes-routed` from the trained tiny-shapes in `source` (`ROUTED`'s two cycles)."""
    first_step = 20_000  # an image stream that tiny-shapes' own cycles never reached
    train(
        steps=ROUTED["mask_steps"],
        lr=ROUTED["mask_lr"],
        resume_from=source,
        first_step=first_step,
        extra_follow_ups=_types(ROUTED["mask_follow_ups"]),
        answer_probe=True,
        mask_image=True,
        **common,
    )
    train(
        steps=ROUTED["penalty_steps"],
        lr=ROUTED["penalty_lr"],
        resume_from=common["out"],
        first_step=first_step + ROUTED["mask_steps"],
        extra_follow_ups=_types(ROUTED["penalty_follow_ups"]),
        answer_probe=True,
        routing_weight=ROUTED["routing_weight"],
        **common,
    )


def train_cycles(args: argparse.Namespace, common: dict) -> None:
    """tiny-shapes' three cycles (or the last ones, with ``--resume``)."""
    extra_follow_ups = _types(args.extra_follow_ups)
    first_cycle, source = (1, args.out) if args.resume is None else (args.resume_cycle, args.resume)
    if first_cycle == 1:
        train(
            steps=args.steps,
            lr=args.lr,
            vision_steps=args.vision_steps,
            extra_follow_ups=extra_follow_ups,
            **common,
        )
    if args.restart_steps and first_cycle <= 2:
        train(
            steps=args.restart_steps,
            lr=args.restart_lr,
            resume_from=source,
            first_step=args.steps,
            extra_follow_ups=extra_follow_ups,
            **common,
        )
        source = args.out
    if args.focus_steps:
        train(
            steps=args.focus_steps,
            lr=args.focus_lr,
            resume_from=source,
            first_step=args.steps + args.restart_steps,
            extra_follow_ups=_types(args.focus_follow_ups),
            train_objects=DEFAULTS["focus_objects"],
            color_lures=args.focus_color_lures,
            swapped_twins=args.focus_swapped_twins,
            question_weight=args.focus_question_weight,
            **common,
        )


def _types(comma_separated: str) -> tuple[str, ...]:
    return tuple(filter(None, comma_separated.split(",")))


if __name__ == "__main__":
    main()
