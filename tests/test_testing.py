"""mmlens.testing: the in-process tokenizer, image processor and tiny random llava-hf checkpoints."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from mmlens.inputs.templates import LLAVA_V1_SYSTEM_PROMPT
from mmlens.testing import build_tiny_llava, make_image_processor, make_tokenizer

TEXTS = [
    f"{LLAVA_V1_SYSTEM_PROMPT} USER: <image>\nWhat colour is the door? ASSISTANT:",
    "Is there a red circle in the top left corner?",
    "Zebra, café & naïve: 42 ≠ 43 🙂\n\ttabs",
]


def test_tokenizer_is_deterministic() -> None:
    first, second = make_tokenizer(), make_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert first(TEXTS).input_ids == second(TEXTS).input_ids
    # Training iterates over hash maps whose order may differ between processes: check a fresh one.
    script = (
        "import hashlib; from mmlens.testing import make_tokenizer; "
        "print(hashlib.sha256(make_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    here = hashlib.sha256(first.backend_tokenizer.to_str().encode()).hexdigest()
    assert other_process.stdout.strip() == here


def test_tokenizer_is_llama_style() -> None:
    tokenizer = make_tokenizer()
    assert 1000 <= len(tokenizer) <= 2000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 258]) == [
        "<unk>",
        "<s>",
        "</s>",
        "<0x00>",
        "<0xFF>",
    ]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # llava-hf appends <image> and <pad> after the vocabulary.
    assert tokenizer.image_token == "<image>"
    assert tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [
        len(tokenizer) - 2,
        len(tokenizer) - 1,
    ]
    assert tokenizer.pad_token_id == len(tokenizer) - 1
    assert tokenizer.padding_side == "left"

    ids = tokenizer("What colour is the door?\nRed").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert "▁colour" in tokens and "<0x0A>" in tokens  # Metaspace words, byte fallback for "\n"
    assert tokenizer.unk_token_id not in tokenizer(TEXTS[2]).input_ids  # bytes, never <unk>
    for text in TEXTS:
        assert tokenizer.decode(
            tokenizer(text).input_ids, skip_special_tokens=True
        ) == text.replace("<image>", "")
    image_ids = tokenizer("a <image><image> b").input_ids
    assert image_ids.count(tokenizer.image_token_id) == 2  # a special token, never split


def test_tokenizer_offsets_point_at_the_token_text() -> None:
    tokenizer = make_tokenizer()
    text = TEXTS[0]
    encoded = tokenizer(text, return_offsets_mapping=True)
    pieces = []
    for token, (start, end) in zip(
        tokenizer.convert_ids_to_tokens(encoded.input_ids), encoded.offset_mapping, strict=True
    ):
        if token == "<s>":
            assert (start, end) == (0, 0)
            continue
        expected = {"<0x0A>": "\n"}.get(token, token.replace("▁", " "))
        if start == 0:  # the "▁" that Metaspace prepends to the text is no character of it
            expected = expected.removeprefix(" ")
        assert text[start:end] == expected
        pieces.append(text[start:end])
    assert "".join(pieces) == text


def test_tokenizer_round_trips_through_save_pretrained(tmp_path) -> None:
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for kwargs in ({}, {"padding": True, "return_offsets_mapping": True}):
        assert loaded(TEXTS, **kwargs) == tokenizer(TEXTS, **kwargs)
    padded = loaded(TEXTS[1:], padding=True)
    assert padded.attention_mask[1][0] == 1 and padded.attention_mask[0][0] == 0  # left padding
    assert (loaded.image_token, loaded.image_token_id) == ("<image>", tokenizer.image_token_id)
    assert len(loaded) == len(tokenizer)


def test_image_processor_pads_resizes_and_normalises_like_llava() -> None:
    processor = make_image_processor(56)
    wide = Image.new("RGB", (90, 50), (255, 0, 0))
    raw = processor(wide, do_normalize=False, return_tensors="np")["pixel_values"][0]
    assert raw.shape == (3, 56, 56)
    # 20 rows of mean-colour padding above the image (90 x 90 canvas) -> rows 0-12.4 after
    # resizing; bicubic mixes in the red image from row ~11 on.
    mean_colour = np.array([int(255 * m) for m in processor.image_mean]) / 255
    np.testing.assert_allclose(
        raw[:, :10].reshape(3, -1).T, np.tile(mean_colour, (10 * 56, 1)), atol=1e-6
    )
    np.testing.assert_allclose(raw[:, 28, 28], [1.0, 0.0, 0.0], atol=1e-6)
    normalised = processor(wide, return_tensors="pt")["pixel_values"][0]
    expected = (raw[:, 28, 28] - np.array(processor.image_mean)) / np.array(processor.image_std)
    np.testing.assert_allclose(normalised[:, 28, 28].numpy(), expected, rtol=1e-5)


def test_checkpoint_loads_back_with_hf_and_gives_varied_logits(tiny_llava_dir, images) -> None:
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    config = model.config
    assert config.image_token_id == processor.tokenizer.image_token_id == processor.image_token_id
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert config.text_config.pad_token_id == processor.tokenizer.pad_token_id
    assert not config.tie_word_embeddings
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)

    text = f"{LLAVA_V1_SYSTEM_PROMPT} USER: <image>\nWhat colour is the door? ASSISTANT:"
    encoded = processor(images=images[1], text=text, return_tensors="pt")
    assert int((encoded.input_ids == config.image_token_id).sum()) == 16  # (56 / 14) ** 2
    with torch.no_grad():
        logits = model(**encoded).logits[0]
        other_image = processor(images=images[2], text=text, return_tensors="pt").pixel_values
        other_logits = model(**{**encoded, "pixel_values": other_image}).logits[0]
    assert torch.isfinite(logits).all()
    probabilities = logits.softmax(-1)
    assert probabilities.max(-1).values.min() > 10 / logits.shape[-1]  # far from uniform
    assert logits.std(-1).min() > 0.5  # spread over the vocabulary at every position ...
    assert logits.std(0).mean() > 0.5  # ... and different between positions
    assert logits.argmax(-1).unique().numel() >= logits.shape[0] // 3
    assert (other_logits[-1] - logits[-1]).abs().max() > 0.1  # the image reaches the last position


def test_random_weights_are_far_from_the_default_init(tiny_llava_dir) -> None:
    weights = load_file(tiny_llava_dir / "model.safetensors")
    norm_weights = [v for k, v in weights.items() if "norm" in k and k.endswith("weight")]
    norm_biases = [v for k, v in weights.items() if "norm" in k and k.endswith("bias")]
    linear_biases = [v for k, v in weights.items() if "norm" not in k and k.endswith("bias")]
    assert len(norm_weights) == 2 * 2 + 1 + 2 * 3 + 2  # decoder 2x2 + final, CLIP 3x2 + pre + post
    assert all(0.1 < w.std() < 0.3 and 0.8 < w.mean() < 1.2 for w in norm_weights)
    assert all(0.02 < b.std() < 0.2 for b in norm_biases + linear_biases)
    unembed = weights["language_model.lm_head.weight"]  # saved with llava-hf's key names
    assert 0.14 < unembed.std() < 0.16
    assert not torch.equal(unembed, weights["language_model.model.embed_tokens.weight"])


def test_weights_depend_only_on_the_seed(tmp_path) -> None:
    paths = [
        build_tiny_llava(tmp_path / name, seed=seed)
        for name, seed in [("a", 0), ("b", 0), ("c", 1)]
    ]
    first, again, other = (load_file(path / "model.safetensors") for path in paths)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(
        first["language_model.lm_head.weight"], other["language_model.lm_head.weight"]
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_kv_heads": 2},
        {"vision_feature_select_strategy": "full"},
        {"vision_feature_layer": [-3, -1]},
        {"projector_hidden_act": "linear", "rope_theta": 500.0, "n_layers": 1},
    ],
    ids=["gqa", "full", "multi-layer", "linear-projector"],
)
def test_variants_load_back_and_run(tiny_checkpoint, images, overrides) -> None:
    folder = tiny_checkpoint(**overrides)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    config = model.config
    for name, value in overrides.items():
        if name in ("n_kv_heads", "rope_theta", "n_layers"):
            continue
        assert getattr(config, name) == value
    text_config = config.text_config
    assert text_config.num_key_value_heads == overrides.get("n_kv_heads", 4)
    assert text_config.rope_parameters["rope_theta"] == overrides.get("rope_theta", 10000.0)
    assert text_config.num_hidden_layers == overrides.get("n_layers", 2)

    encoded = processor(
        images=images[0], text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt"
    )
    n_image_tokens = 16 + (overrides.get("vision_feature_select_strategy") == "full")
    assert int((encoded.input_ids == config.image_token_id).sum()) == n_image_tokens
    assert config.image_seq_length == n_image_tokens
    with torch.no_grad():
        logits = model(**encoded).logits
    assert torch.isfinite(logits).all() and logits.std(-1).min() > 0.5

    projector = model.model.multi_modal_projector
    if overrides.get("projector_hidden_act") == "linear":  # HF: two Linear layers, identity between
        features = torch.randn(5, projector.linear_1.in_features)
        with torch.no_grad():
            expected = projector.linear_2(projector.linear_1(features))
            torch.testing.assert_close(projector(features), expected)
    if "vision_feature_layer" in overrides:  # features of two layers are concatenated
        assert projector.linear_1.in_features == 2 * config.vision_config.hidden_size
