"""Conversation templates of each checkpoint family, the family tokenizers of mmlens.testing, and
the segments (`positions`) they give through each family's LLaVA-NeXT processor."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from mmlens.inputs import MultimodalInput
from mmlens.inputs.templates import (
    CHATML_SYSTEM_PROMPT,
    CROSS_MODAL_SUFFIX,
    LLAVA_V1_SYSTEM_PROMPT,
    TEMPLATES,
    default_template,
    get_template,
    render,
)
from mmlens.testing import FAMILIES, make_test_image, make_tokenizer

QUESTION = "What colour is the door?"
ANSWER = "The door is red."
FAMILY_TEMPLATES = {"vicuna": "vicuna_v1", "mistral": "mistral_instruct", "llama3": "llama3"}
TEXTS = [
    "<|start_header_id|>user<|end_header_id|>\n\nIs there a red circle?<|eot_id|>",
    "[INST] What colour is the door? [/INST] The door is red.",
    "Zebra, café & naïve: 42 ≠ 43 🙂\n\ttabs",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {family: make_tokenizer(family) for family in FAMILIES}


@pytest.fixture(scope="module", params=FAMILIES)
def family_processor(request, tiny_next_checkpoint):
    return request.param, AutoProcessor.from_pretrained(tiny_next_checkpoint(family=request.param))


def arange(start: int, stop: int) -> list[int]:
    return list(range(start, stop))


# --- rendering -------------------------------------------------------------------------------


def test_each_template_renders_its_checkpoints_prompt() -> None:
    expected = {
        "llava_v1": f"{LLAVA_V1_SYSTEM_PROMPT} USER: <image>\n{QUESTION} ASSISTANT:",
        # LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO, sep " "), written out by hand.
        "vicuna_v1": (
            "A chat between a curious user and an artificial intelligence assistant. The "
            "assistant gives helpful, detailed, and polite answers to the user's questions. "
            f"USER: <image>\n{QUESTION} ASSISTANT:"
        ),
        "mistral_instruct": f"[INST] <image>\n{QUESTION} [/INST]",
        "llama3": (
            f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{QUESTION}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "chatml": (
            f"<|im_start|>system\n{CHATML_SYSTEM_PROMPT}<|im_end|><|im_start|>user\n"
            f"<image>\n{QUESTION}<|im_end|><|im_start|>assistant\n"
        ),
        # InstructBLIP: the image's queries, then the instruction as it is.
        "instructblip": f"<image>{QUESTION}",
        # LLaVA-NeXT's conv_qwen (SeparatorStyle.CHATML, sep "<|im_end|>"), written out by hand.
        "qwen_1_5": (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"<image>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
        ),
    }
    for name, text in expected.items():
        rendered = render(name, QUESTION, n_images=1)
        assert rendered.text == text, name
        assert rendered.text[slice(*rendered.question_span)] == QUESTION
        assert [rendered.text[slice(*span)] for span in rendered.image_spans] == ["<image>"]
        assert rendered.user_start == rendered.image_spans[0][0]
        assert get_template(name).last_token
    # The original code's names (their texts: tests/test_original_llava.py); the Qwen families'
    # formats wrap their own image tokens (their texts: tests/test_qwen2_vl.py,
    # tests/test_qwen3_vl.py, and Qwen-VL's against the release's make_context in
    # tests/test_qwen_vl.py); Gemma 3's against its chat template in tests/test_gemma3.py; the v0
    # releases' (Shikra, LLaVA v0) in tests/test_shikra.py.
    # tests/test_qwen_vl.py); InternVL's against its checkpoint's chat template in
    # tests/test_internvl.py, and its original releases' conversations against the release's
    # conversation.py in tests/test_internvl_release.py.
    assert set(TEMPLATES) == {
        *expected,
        "plain",
        "chatml_direct",
        "llava_llama_3",
        "qwen2_vl",
        "qwen3_vl",
        "qwen_vl",
        "qwen_vl_chat",
        "gemma3",
        "shikra",
        "llava_v0",
        "internvl",
        "internlm2_chat",
        "internvl2_5",
    }


def test_system_text_goes_into_each_templates_system_slot() -> None:
    expected = {
        "llava_v1": f"Be brief. USER: {QUESTION} ASSISTANT:",
        "mistral_instruct": f"[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n{QUESTION} [/INST]",
        "llama3": (
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
        "chatml": (
            f"<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n{QUESTION}<|im_end|>"
            "<|im_start|>assistant\n"
        ),
        "qwen_1_5": (
            f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
    }
    for name, text in expected.items():
        rendered = render(name, QUESTION, n_images=0, system="Be brief.")
        assert rendered.text == text, name
        assert rendered.user_start == rendered.question_span[0] == text.index(QUESTION)
    # An empty system text drops the whole system turn, header included.
    assert render("chatml", "Hi", n_images=0, system="").text.startswith("<|im_start|>user\n")


def test_default_template_follows_the_tokenizer_and_decoder(tokenizers) -> None:
    assert default_template(tokenizers["vicuna"], "llama") == "vicuna_v1"
    assert default_template(tokenizers["mistral"], "mistral") == "mistral_instruct"
    assert default_template(tokenizers["llama3"], "llama") == "llama3"
    yi_style = make_tokenizer("vicuna")
    yi_style.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    assert default_template(yi_style, "llama") == "chatml"


# --- family tokenizers -----------------------------------------------------------------------


def test_family_tokenizers_are_deterministic_across_processes(tokenizers) -> None:
    script = (
        "import hashlib; from mmlens.testing import make_tokenizer; "
        "print(*(hashlib.sha256(make_tokenizer(f).backend_tokenizer.to_str().encode()).hexdigest()"
        " for f in ('mistral', 'llama3')))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    here = [
        hashlib.sha256(tokenizers[family].backend_tokenizer.to_str().encode()).hexdigest()
        for family in ("mistral", "llama3")
    ]
    assert other.stdout.split() == here


def test_llama3_tokenizer_is_byte_level_with_llama3_specials(tokenizers) -> None:
    tokenizer = tokenizers["llama3"]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<image>", "<pad>"]  # fmt: skip
    assert tokenizer.convert_tokens_to_ids(specials) == arange(len(tokenizer) - 7, len(tokenizer))
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
    assert tokenizer.unk_token is None and tokenizer.padding_side == "left"
    assert tokenizer.convert_ids_to_tokens(tokenizer("\n\n").input_ids) == [
        "<|begin_of_text|>",
        "ĊĊ",
    ]
    for text in TEXTS:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids[1:]) == text  # bytes, never <unk>
    for text in TEXTS[:2]:  # ASCII: one character per byte, so offsets tile the text exactly
        encoded = tokenizer(text, return_offsets_mapping=True)
        pieces = [text[start:end] for start, end in encoded.offset_mapping[1:]]
        assert "".join(pieces) == text  # offsets tile the text: "Ġdoor" covers " door"
        for token_id, piece in zip(encoded.input_ids[1:], pieces, strict=True):
            assert tokenizer.decode([token_id]) == piece


def test_mistral_tokenizer_keeps_inst_as_plain_text(tokenizers) -> None:
    tokenizer = tokenizers["mistral"]
    ids = tokenizer("[INST] Hi [/INST]").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "[INST] Hi [/INST]"
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<0x00>"]
    assert tokenizer.backend_tokenizer.to_str() != tokenizers["vicuna"].backend_tokenizer.to_str()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tokenizers_round_trip_through_save_pretrained(tokenizers, family, tmp_path) -> None:
    tokenizer = tokenizers[family]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for kwargs in ({}, {"padding": True, "return_offsets_mapping": True}):
        assert loaded(TEXTS, **kwargs) == tokenizer(TEXTS, **kwargs)
    assert (loaded.image_token, loaded.image_token_id) == ("<image>", tokenizer.image_token_id)
    assert loaded.pad_token_id == len(loaded) - 1


# --- segments through each family's processor ------------------------------------------------


def test_segments_of_each_family(family_processor) -> None:
    family, processor = family_processor
    tokenizer = processor.tokenizer
    image = make_test_image(64, 48)
    inp = MultimodalInput.from_processor(
        processor, image, QUESTION, template=FAMILY_TEMPLATES[family]
    )
    text = render(FAMILY_TEMPLATES[family], QUESTION, n_images=1).text
    assert inp.prompts == [text]
    # Independent counts: the text before the placeholder tokenized alone (with BOS), and the
    # processor's image-token count (16 base + 6 kept rows x (8 + 1) for a 64 x 48 image).
    n_prefix = len(tokenizer(text[: text.index("<image>")]).input_ids)
    n_image = 16 + 6 * 9
    n_total = len(tokenizer(text).input_ids) - 1 + n_image
    assert inp.input_ids.shape == (1, n_total)
    assert inp.positions("system").tolist() == arange(0, n_prefix)
    assert inp.positions("image").tolist() == arange(n_prefix, n_prefix + n_image)
    assert inp.positions("user").tolist() == arange(n_prefix + n_image, n_total)
    assert inp.positions("last").tolist() == [n_total - 1]
    question = inp.positions("question")
    assert tokenizer.decode(inp.input_ids[0, question]).strip() == QUESTION
    # The question's tokens come right after the image's "\n" token.
    assert tokenizer.decode(inp.input_ids[0, n_prefix + n_image : int(question[0])]) == "\n"
    assert inp.find("door").tolist()[0] in question.tolist()
    assert inp.find("<image>").tolist() == inp.positions("image").tolist()


def test_a_suffix_is_in_the_user_turn_but_not_in_the_question(family_processor) -> None:
    family, processor = family_processor
    template = FAMILY_TEMPLATES[family]
    rendered = render(template, QUESTION, n_images=1, suffix=CROSS_MODAL_SUFFIX)
    assert rendered.text == render(template, QUESTION + CROSS_MODAL_SUFFIX, n_images=1).text
    assert rendered.text[slice(*rendered.question_span)] == QUESTION
    image = make_test_image(64, 48)
    with_suffix = MultimodalInput.from_processor(
        processor, image, QUESTION, template=template, suffix=CROSS_MODAL_SUFFIX
    )
    plain = MultimodalInput.from_processor(processor, image, QUESTION, template=template)
    question = with_suffix.positions("question")
    # The question's tokens are the same as without the suffix, at the same positions.
    assert torch.equal(question, plain.positions("question"))
    tokenizer = processor.tokenizer
    assert tokenizer.decode(with_suffix.input_ids[0, question]).strip() == QUESTION
    user = with_suffix.positions("user")
    after_question = user[user > question.max()]
    assert "Answer the question using a single word or phrase" in tokenizer.decode(
        with_suffix.input_ids[0, after_question]
    )
    with pytest.raises(ValueError, match="write the suffix in it"):
        render("plain", "<image>\nHi", n_images=1, suffix=" Answer.")


LAST_TOKENS = {"vicuna": "▁ASSISTANT:", "mistral": "▁[/INST]", "llama3": "ĊĊ"}
FIRST_ANSWER_TOKENS = {"vicuna": "▁The", "mistral": "▁The", "llama3": "The"}


def test_last_predicts_the_answers_first_word(family_processor) -> None:
    """`last` is the final prompt token; the answer's first word (after the template's
    answer_prefix) is the very next token: for Llama-3 the prompt already holds the header's
    "\\n\\n", so the first prediction is "The", never a newline."""
    family, processor = family_processor
    tokenizer = processor.tokenizer
    template = get_template(FAMILY_TEMPLATES[family])
    inp = MultimodalInput.from_processor(processor, None, QUESTION, template=template)
    last = int(inp.positions("last")[0])
    assert tokenizer.convert_ids_to_tokens(int(inp.input_ids[0, last])) == LAST_TOKENS[family]
    prompt_ids = inp.input_ids[0].tolist()
    with_answer = tokenizer(inp.prompts[0] + template.answer_prefix + ANSWER).input_ids
    assert with_answer[: len(prompt_ids)] == prompt_ids  # the answer only appends tokens
    first_answer = tokenizer.convert_ids_to_tokens(with_answer[len(prompt_ids)])
    assert first_answer == FIRST_ANSWER_TOKENS[family]
    assert tokenizer.decode(with_answer[len(prompt_ids) :]).strip() == ANSWER


def test_text_only_segments_of_each_family(family_processor) -> None:
    family, processor = family_processor
    inp = MultimodalInput.from_processor(
        processor,
        [None, make_test_image(22, 22)],
        [QUESTION, "Hi"],
        template=FAMILY_TEMPLATES[family],
    )
    tokenizer = processor.tokenizer
    pad = int((inp.attention_mask[0] == 0).sum())
    assert pad > 0  # the text-only item is shorter than the one with an image
    tiled = torch.cat([inp.positions(name) for name in ("system", "image", "user")])
    assert tiled.tolist() == arange(pad, inp.input_ids.shape[1])
    first_user = int(inp.positions("user")[0])
    assert first_user == int(inp.positions("question")[0])  # no image: user starts at the question
    assert tokenizer.decode(inp.input_ids[0, inp.positions("question")]).strip() == QUESTION


def test_chatml_segments_with_a_yi_style_tokenizer(tiny_next_checkpoint) -> None:
    """llava-v1.6-34b: a SentencePiece-style tokenizer with ChatML's special tokens."""
    processor = AutoProcessor.from_pretrained(tiny_next_checkpoint(family="vicuna"))
    processor.tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    inp = MultimodalInput.from_processor(
        processor, make_test_image(56, 56), QUESTION, template="chatml"
    )
    tokenizer, text = processor.tokenizer, inp.prompts[0]
    system = inp.positions("system")
    assert tokenizer.decode(inp.input_ids[0, system]) == "<s>" + text[: text.index("<image>")]
    assert len(inp.positions("image")) == 16 + 8 * 9
    assert tokenizer.decode(inp.input_ids[0, inp.positions("question")]).strip() == QUESTION
    assert tokenizer.decode(inp.input_ids[0, inp.positions("last")]).endswith("\n")
