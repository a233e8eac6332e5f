"""The papers' original pipelines (docs/semantics.md, "Reproducing the papers' settings"):
LLaVA-NeXT's original anyres rule, the original conversation templates and `tokenizer_image_token`.

Every expectation is computed here from the rules as the original code states them (sizes as
(width, height), `int()` unpadding, chunks tokenised apart), never by calling mmlens' own helpers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import mmlens
from mmlens.models.llava_next.geometry import AnyresGrid
from mmlens.testing import make_test_image

V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def original_canvas(width: int, height: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The original `select_best_resolution`: image size and pinpoints are (width, height); the
    first candidate wins ties. Returns the canvas (width, height)."""
    best, best_effective, best_wasted = None, -1, math.inf
    for canvas_width, canvas_height in pinpoints:
        scale = min(canvas_width / width, canvas_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_width * canvas_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_width, canvas_height), effective, wasted
    return best


def original_kept(width: int, height: int, rows: int, cols: int) -> tuple[int, int]:
    """The original `unpad_image` on a grid of rows x cols patches: kept rows and columns."""
    if width / height > cols / rows:
        padding = (rows - int(height * (cols / width))) // 2
        return rows - 2 * padding, cols
    padding = (cols - int(width * (rows / height))) // 2
    return rows, cols - 2 * padding


def original_n_tokens(width: int, height: int, tile: int = 336, patch: int = 14) -> int:
    canvas_width, canvas_height = original_canvas(width, height, V16_PINPOINTS)
    rows, cols = canvas_height // patch, canvas_width // patch
    kept_rows, kept_cols = original_kept(width, height, rows, cols)
    return (tile // patch) ** 2 + kept_rows * (kept_cols + 1)


@pytest.mark.parametrize(
    ("width", "height", "llava_tokens", "hf_tokens"),
    [
        (300, 200, 976, 1464),
        (704, 396, 1850, 1948),
        (640, 480, 2340, 2340),
    ],  # 36 x 48 kept + 36 newlines,
)
def test_the_issues_measured_token_counts(width, height, llava_tokens, hf_tokens):
    counts = {
        rule: 576 + AnyresGrid.for_image((height, width), V16_PINPOINTS, 336, 14, rule).n_tokens
        for rule in ("llava", "hf")
    }
    assert counts == {"llava": llava_tokens, "hf": hf_tokens}


def test_anyres_llava_follows_the_original_rules_at_every_size():
    sizes = [(width, height) for width in range(20, 1100, 37) for height in range(20, 1100, 41)]
    differ = 0
    for width, height in sizes:
        grid = AnyresGrid.for_image((height, width), V16_PINPOINTS, 336, 14, "llava")
        canvas_width, canvas_height = original_canvas(width, height, V16_PINPOINTS)
        assert grid.tiles == (canvas_height // 336, canvas_width // 336), (width, height)
        rows, cols = original_kept(width, height, canvas_height // 14, canvas_width // 14)
        assert grid.unpadded_size == (rows, cols), (width, height)
        assert 576 + grid.n_tokens == original_n_tokens(width, height)
        hf = AnyresGrid.for_image((height, width), V16_PINPOINTS, 336, 14, "hf")
        differ += hf.n_tokens != grid.n_tokens
    assert differ > 0  # the rules really differ on some of these sizes


def test_anyres_rule_is_checked():
    with pytest.raises(ValueError, match="anyres='original'.*hf, llava"):
        AnyresGrid.for_image((20, 30), V16_PINPOINTS, 336, 14, "original")


# --- the tiny LLaVA-NeXT: pixels, tokens and packing of the original rule ----------------------


@pytest.fixture(scope="module")
def tiny_next(tiny_next_checkpoint):
    folder = tiny_next_checkpoint(family="vicuna")
    return mmlens.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def clip_normalise(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def test_prepare_with_anyres_llava_tiles_as_the_original(tiny_next):
    model, _ = tiny_next
    image = make_test_image(20, 14)  # both sides <= 28 px: the two 1x2 canvases tie
    inp = model.prepare(image, "What is it?", anyres="llava")
    hf_inp = model.prepare(image, "What is it?")
    # The original takes the first pinpoint [28, 56] as width 28, height 56: two tiles stacked.
    canvas_width, canvas_height = original_canvas(20, 14, [[28, 56], [56, 28]])
    assert (canvas_width, canvas_height) == (28, 56)
    scale_w, scale_h = canvas_width / 20, canvas_height / 14
    new_size = (28, min(math.ceil(14 * scale_w), 56)) if scale_w < scale_h else None
    canvas = Image.new("RGB", (canvas_width, canvas_height))
    canvas.paste(image.resize(new_size, Image.BICUBIC), (0, (canvas_height - new_size[1]) // 2))
    expected = [image.resize((28, 28), Image.BICUBIC)]  # the base crop
    expected += [canvas.crop((0, top, 28, top + 28)) for top in (0, 28)]
    expected_pixels = torch.stack([clip_normalise(crop) for crop in expected])
    assert inp.pixel_values.shape[1] == 3
    assert (inp.pixel_values[0] - expected_pixels).abs().max() < 1e-5
    # Tokens: 4 x 4 base patches; the 8 x 4 canvas grid keeps int(14 * 4 / 20) = 2 rows.
    rows, cols = original_kept(20, 14, 8, 4)
    assert (rows, cols) == (2, 4)
    assert len(inp.positions("image")) == 16 + rows * (cols + 1) == 26
    assert len(hf_inp.positions("image")) == 16 + 4 * (6 + 1) == 44  # HF: 1x2, 6 columns kept
    assert inp.anyres == "llava" and inp.model_kwargs()["anyres"] == "llava"
    assert "anyres" not in hf_inp.model_kwargs()


def test_model_packs_by_the_rule_of_the_input(tiny_next):
    model, _ = tiny_next
    inp = model.prepare(make_test_image(20, 14), "What is it?", anyres="llava")
    _, cache = model.run_with_cache(inp, names_filter="hook_image_embeds")
    with torch.no_grad():
        crops = model.projector(
            model.vision(
                inp.pixel_values[0],
                model.cfg.vision_feature_layers,
                model.cfg.vision_feature_select_strategy,
            )
        )
    # Independent packing: base crop, then canvas rows 3..4 of the two stacked tiles (8 x 4
    # patches, padding (8 - 2) // 2 = 3), each row followed by the newline embedding.
    canvas = torch.cat([crops[1].reshape(4, 4, -1), crops[2].reshape(4, 4, -1)])
    rows = [torch.cat([canvas[row], model.image_newline[None]]) for row in (3, 4)]
    expected = torch.cat([crops[0], *rows])
    assert (cache["hook_image_embeds"][0] - expected).abs().max() < 1e-5
    # The whole image's box covers every patch of both grids, none of the newlines.
    everything = inp.patches_in_box((0, 0, 20, 14))
    assert len(everything) == 16 + 2 * 4


def test_anyres_is_checked_where_it_applies(tiny_next, tiny_llava_dir):
    model, _ = tiny_next
    with pytest.raises(ValueError, match="anyres='tiles'"):
        model.prepare(make_test_image(20, 14), "What?", anyres="tiles")
    llava = mmlens.from_pretrained(tiny_llava_dir)
    with pytest.raises(
        ValueError, match="anyres='llava' does not apply to this checkpoint's single-crop"
    ):
        llava.prepare(make_test_image(20, 14), "What?", anyres="llava")


# --- conversation templates: the text of the original conversation.py ----------------------

QUESTION = "What colour is the door?"
LLAMA3_INSTRUCT_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)


def conversation_prompt(style: str, system: str, roles: tuple[str, str], sep: str, message: str):
    """`Conversation.get_prompt()` of one user message and an open assistant turn, for the
    separator styles of LLaVA's conversation.py, written from their definitions."""
    turns = [(roles[0], message), (roles[1], None)]
    if style == "TWO":  # system + sep, then "ROLE: message" + sep / sep2, open turn "ROLE:"
        text = system + sep
        for role, content in turns:
            text += f"{role}: {content}{sep}" if content else f"{role}:"
        return text
    if style == "LLAMA_2":  # "[INST] <<SYS>>...<</SYS>>\n\n message [/INST]", sep "" stripped
        system_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
        return f"[INST] {system_block}{message} [/INST]"
    if style == "MPT":  # system + sep, then role + message + sep, open turn: role
        text = system + sep
        for role, content in turns:
            text += role + content + sep if content else role
        return text
    raise AssertionError(style)


def test_templates_render_the_original_conversations():
    message = f"<image>\n{QUESTION}"
    expected = {
        "vicuna_v1": conversation_prompt(
            "TWO",
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions.",
            ("USER", "ASSISTANT"),
            " ",
            message,
        ),
        "llava_v1": conversation_prompt(
            "TWO",
            "A chat between a curious human and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the human's questions.",
            ("USER", "ASSISTANT"),
            " ",
            message,
        ),
        "mistral_instruct": conversation_prompt("LLAMA_2", "", ("USER", "ASSISTANT"), "", message),
        "chatml_direct": conversation_prompt(
            "MPT",
            "<|im_start|>system\nAnswer the questions.",
            ("<|im_start|>user\n", "<|im_start|>assistant\n"),
            "<|im_end|>",
            message,
        ),
    }
    for name, text in expected.items():
        assert mmlens.inputs.render(name, QUESTION, n_images=1).text == text, name
    # llava_llama_3: Llama-3-Instruct's chat template over a system turn and the user turn.
    tokenizer = mmlens.testing.make_tokenizer("llama3")
    system = (
        "You are a helpful language and vision assistant. You are able to understand the "
        "visual content that the user provides, and assist the user with a variety of tasks "
        "using natural language."
    )
    original = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": message}],
        chat_template=LLAMA3_INSTRUCT_CHAT_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    rendered = mmlens.inputs.render("llava_llama_3", QUESTION, n_images=1)
    assert rendered.text == original
    assert rendered.text[slice(*rendered.question_span)] == QUESTION


# --- tokenizer_image_token ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint())


def test_llava_tokenization_adds_the_sentencepiece_space_after_the_image(tiny_llava):
    model = tiny_llava
    image = make_test_image(40, 30)
    kwargs = dict(template="vicuna_v1", suffix=mmlens.inputs.templates.CROSS_MODAL_SUFFIX)
    hf = model.prepare(image, QUESTION, **kwargs)
    llava = model.prepare(image, QUESTION, tokenization="llava", **kwargs)
    tokenizer = model.tokenizer
    hf_ids, llava_ids = hf.input_ids[0].tolist(), llava.input_ids[0].tolist()
    after_image = int(hf.positions("image")[-1]) + 1
    # The same ids, but for one "▁" right after the image (the text after "<image>" tokenised
    # on its own gets SentencePiece's leading space).
    assert len(llava_ids) == len(hf_ids) + 1
    assert tokenizer.convert_ids_to_tokens(llava_ids[after_image]) == "▁"
    assert llava_ids[:after_image] + llava_ids[after_image + 1 :] == hf_ids
    # Each piece is tokenised alone, its BOS dropped after the first piece.
    before, after = llava.prompts[0].split("<image>")
    n_image = len(hf.positions("image"))
    assert llava_ids == (
        tokenizer(before).input_ids
        + [llava.image_token_id] * n_image
        + tokenizer(after).input_ids[1:]
    )
    # Segments shift with the tokens: the question is its own tokens, one position later.
    assert torch.equal(llava.positions("question"), hf.positions("question") + 1)
    assert torch.equal(llava.positions("image"), hf.positions("image"))
    words = tokenizer.decode(llava.input_ids[0, llava.positions("question")]).strip()
    assert words == QUESTION
    assert llava.tokenization == "llava"
    logits = model(llava)  # runs: the image slots are filled as usual
    assert logits.shape[1] == len(llava_ids)


def test_llava_tokenization_pads_a_batch_on_the_left(tiny_llava):
    model = tiny_llava
    images = [make_test_image(40, 30), None]
    batch = model.prepare(images, [QUESTION, "Hi"], tokenization="llava")
    for item in range(2):
        alone = model.prepare(images[item], [QUESTION, "Hi"][item], tokenization="llava")
        assert torch.equal(batch.item(item).input_ids, alone.input_ids)
        assert torch.equal(batch.item(item).positions("question"), alone.positions("question"))
    assert batch.attention_mask[1, 0] == 0 and batch.input_ids[1, 0] == model.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="tokenization='sentencepiece'.*hf, llava"):
        model.prepare(images[0], QUESTION, tokenization="sentencepiece")


def test_llava_llama_3_starts_with_two_bos_tokens_as_the_original(tiny_next_checkpoint):
    model = mmlens.from_pretrained(tiny_next_checkpoint(family="llama3"))
    image = make_test_image(40, 30)
    llava = model.prepare(image, QUESTION, template="llava_llama_3", tokenization="llava")
    hf = model.prepare(image, QUESTION, template="llava_llama_3")
    bos = model.tokenizer.bos_token_id
    assert llava.input_ids[0, :3].tolist()[:2] == [bos, bos] and llava.input_ids[0, 2] != bos
    # A byte-level BPE adds no space after the image: both tokenisations agree.
    assert torch.equal(llava.input_ids, hf.input_ids)
