"""The original Qwen-VL / Qwen-VL-Chat on random checkpoints in the release layout
(`build_tiny_qwen_vl`), against the release's code transcribed in tests/qwen_vl_reference.py:
the tokenizer (tiktoken) and chat context, the pixels, logits and every residual in a
left-padded batch of images of different sizes, the tower and resampler, greedy generation,
weights from ``.bin``, the folder's Python never running, the segments, LLaVA-CAM through the
resampler, the presets and the runner."""

from __future__ import annotations

import json
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from qwen_vl_reference import QWenLMHeadModel, QWenTokenizer, image_transform

import mmlens
from mmlens.ablations import attention_knockout, drop_tokens
from mmlens.inputs import QUERY
from mmlens.models.family import ImageTokenGeometry, VisionLanguageFamily
from mmlens.presets import CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE
from mmlens.testing import build_tiny_qwen_vl, make_test_image

QUESTIONS = ["What colour is the star?", "Is the door open or closed?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen_vl(tmp_path_factory.mktemp("qwen-vl"))


@pytest.fixture(scope="module")
def config(folder):
    return json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def reference(folder, config):
    return QWenLMHeadModel.from_release(folder, config)


@pytest.fixture(scope="module")
def reference_tokenizer(folder, config):
    return QWenTokenizer(folder, config["visual"]["n_queries"])


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """Two images at paths short enough for the tiny checkpoints' 16-token image span (the
    release writes the path's bytes there), relative to the folder the module runs in."""
    folder = tmp_path_factory.mktemp("images")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        paths = []
        for index, size in enumerate([(88, 48), (40, 80)]):
            path = Path(f"i{index}.png")
            make_test_image(*size, seed=index).save(path)
            paths.append(path)
        yield paths


@pytest.fixture(scope="module")
def images(image_files):
    from PIL import Image

    return [Image.open(path).convert("RGB") for path in image_files]


def reference_ids(tokenizer, image_files, questions):
    """The release's chat context of each question with its image, left-padded with
    ``<|endoftext|>`` as the release pads a batch."""
    rows = [
        tokenizer.make_context(f"Picture 1: <img>{path}</img>\n{question}")
        for path, question in zip(image_files, questions, strict=True)
    ]
    length = max(map(len, rows))
    pad = tokenizer.special_tokens["<|endoftext|>"]
    ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def test_loads_as_qwen_vl_and_satisfies_the_contract(model, images, config):
    assert type(model).__name__ == "HookedQwenVL" and isinstance(model, VisionLanguageFamily)
    assert model.default_template == "qwen_vl_chat"
    assert model.cfg.d_mlp == config["intermediate_size"] // 2 and model.cfg.qkv_bias
    assert model.cfg.vision.n_positions == 64 and not model.cfg.vision.has_cls
    assert model.resampler.n_heads == config["hidden_size"] // 128
    inp = model.prepare(images[0], QUESTIONS[0])
    assert isinstance(inp.image_geometry[0], ImageTokenGeometry)
    assert "modeling_qwen" not in sys.modules and "visual" not in sys.modules


def test_the_tokenizer_equals_the_releases_tiktoken_tokenizer(model, reference_tokenizer, images):
    texts = [
        "What colour is the star? Answer: red.",
        "  two  spaces,\ttabs\n\nand newlines\r\n",
        "numbers 12345 and 3.14, it's 'quoted' they'll",
        "unicode: café naïve 東京 😀 — dash",
        "cafe\u0301 decomposed (NFC makes it café)",
        "<|im_start|>user\nPicture 1: <img></img>\nHi<|im_end|>",
        "<ref>the cat</ref><box>(10,20),(30,40)</box>",
    ]
    for text in texts:
        expected = reference_tokenizer.encode(text)
        # The processor expands <img></img> to the image's span, as the release's tokenize.
        encoded = model.processor(images=images[:1] if "<img>" in text else None, text=text)
        assert encoded["input_ids"][0].tolist() == expected, text
        if "<img>" not in text:
            assert model.tokenizer.decode(expected) == unicodedata.normalize("NFC", text)


def test_prepare_gives_the_releases_chat_context_and_pixels(
    model, images, image_files, reference_tokenizer
):
    inp = model.prepare(images, QUESTIONS)
    ids, mask = reference_ids(reference_tokenizer, image_files, QUESTIONS)
    assert torch.equal(inp.attention_mask, mask)
    # The release writes the image's path between <img> and </img>; mmlens pads: the same
    # ids everywhere else, and the 256 (here 16) slots the image features replace.
    image_slots = inp.input_ids == model.cfg.image_token_id
    assert torch.equal(inp.input_ids[~image_slots], ids[~image_slots])
    assert int(image_slots.sum()) == 2 * 16
    start = model.processor.image_start_id
    assert torch.equal((ids == start).nonzero(), (inp.input_ids == start).nonzero())
    expected = torch.stack([image_transform(path, 84) for path in image_files])
    torch.testing.assert_close(inp.pixel_values, expected, atol=1e-6, rtol=0)


def test_segments_and_layout(model, images):
    inp = model.prepare(images[0], QUESTIONS[0])
    tokens = model.to_str_tokens(inp.input_ids[0])
    image = inp.positions("image")
    assert image.tolist() == list(range(int(image[0]), int(image[0]) + 16))
    assert model.to_string(inp.input_ids[0, : image[0]]).endswith("Picture 1: <img>")
    assert model.to_string(inp.input_ids[0, inp.positions("question")]) == QUESTIONS[0]
    assert tokens[-1] == "Ċ" and model.to_string(inp.input_ids[0, -3:]) == "<|im_start|>assistant\n"
    layout = inp.layout
    assert (layout.kind == QUERY).all() and layout.col.tolist() == list(range(16))
    with pytest.raises(ValueError, match="learned queries.*resampler.hook_pattern"):
        inp.patches_in_box((0, 0, 10, 10))


def test_matches_the_release_in_a_padded_batch(
    model, reference, images, image_files, reference_tokenizer
):
    inp = model.prepare(images, QUESTIONS)
    ids, mask = reference_ids(reference_tokenizer, image_files, QUESTIONS)
    with torch.no_grad():
        expected_logits, states = reference(ids, mask)
        logits, cache = model.run_with_cache(inp)
    real = mask.bool()
    assert logits.std() > 0.5, "random checkpoint too flat for parity to mean anything"
    assert (logits - expected_logits)[real].abs().max() < 1e-4
    for layer in range(model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (resid - states[layer])[real].abs().max() < 1e-4, layer
    with torch.no_grad():
        features = reference.transformer.visual.encode(image_files)
    torch.testing.assert_close(cache["hook_image_embeds"], features, atol=1e-4, rtol=0)
    assert cache["resampler.hook_pattern"].shape == (2, 2, 16, 36)  # 6 x 6 patches
    torch.testing.assert_close(
        cache["resampler.hook_pattern"].sum(-1), torch.ones(2, 2, 16), atol=1e-5, rtol=0
    )


def test_a_padded_item_equals_the_item_alone(model, images):
    batch = model.prepare(images, QUESTIONS)
    alone = model.prepare(images[1], QUESTIONS[1])
    with torch.no_grad():
        assert (model(batch)[1, -1] - model(alone)[0, -1]).abs().max() < 1e-4


def test_greedy_generation_matches_the_release(
    model, reference, images, image_files, reference_tokenizer
):
    inp = model.prepare(images[0], QUESTIONS[0])
    ids, _ = reference_ids(reference_tokenizer, image_files[:1], QUESTIONS[:1])
    with torch.no_grad():
        expected = reference.greedy(ids, 6)[:, ids.shape[1] :]
        generated = model.generate(inp, max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(generated[:, inp.input_ids.shape[1] :], expected)


def test_bin_weights_and_the_raw_format_load(tmp_path, model, images):
    folder = build_tiny_qwen_vl(tmp_path / "base", chat_format="raw", weights="bin")
    assert not list(folder.glob("*.safetensors"))
    base = mmlens.from_pretrained(folder)
    assert base.default_template == "qwen_vl"
    assert base.cfg.eos_token_id == model.cfg.pad_token_id  # <|endoftext|> only
    inp = base.prepare(images[0], QUESTIONS[0])
    assert inp.prompts[0] == f"Picture 1: <img></img>\n{QUESTIONS[0]}"
    chat_inp = model.prepare(images[0], QUESTIONS[0], template="qwen_vl")
    with torch.no_grad():  # the same seed: the same weights, read from .bin
        torch.testing.assert_close(base(inp), model(chat_inp), atol=0, rtol=0)


def test_errors(model, images, folder, tmp_path):
    with pytest.raises(ValueError, match="write each image as '<img></img>'"):
        model.prepare(None, "Picture 1: <img>cat.jpg</img>\nWhat is it?", template="plain")
    with pytest.raises(ValueError, match="one image per placeholder|placeholder"):
        model.prepare(None, "Picture 1: <img></img>\nWhat is it?", template="plain")
    short = tmp_path / "short"
    short.mkdir()
    for path in folder.iterdir():
        (short / path.name).symlink_to(path)
    config = json.loads((folder / "config.json").read_text())
    (short / "config.json").unlink()
    (short / "config.json").write_text(json.dumps({**config, "seq_length": 60}))
    limited = mmlens.from_pretrained(short)
    inp = limited.prepare(images[0], QUESTIONS[0])
    assert inp.input_ids.shape[1] < 60
    with pytest.raises(ValueError, match="training length of 60 tokens.*dynamic NTK"):
        limited.generate(inp, max_new_tokens=20, stop_at_eos=False)


def test_dropping_the_image_equals_knocking_it_out(model, images):
    inp = model.prepare(images[0], QUESTIONS[0])
    image = inp.positions("image")
    after = torch.arange(int(image[-1]) + 1, inp.input_ids.shape[1])
    dropped = model.run_with_hooks(inp, fwd_hooks=drop_tokens(image, from_layer=1))
    knocked = model.run_with_hooks(
        inp, fwd_hooks=attention_knockout(image, after, range(1, model.cfg.n_layers))
    )
    torch.testing.assert_close(dropped[:, -1], knocked[:, -1], atol=1e-5, rtol=0)
    assert (model(inp)[:, -1] - knocked[:, -1]).abs().max() > 1e-3


def test_llava_cam_goes_through_the_resamplers_cross_attention(
    model, reference, images, image_files, reference_tokenizer
):
    """Decoder maps: Grad-CAM relevance of each query, spread over the patches by the
    resampler's mean attention; vision maps: Grad-CAM on the patches; both against autograd
    through the transcribed release."""
    inp = model.prepare(images[0], QUESTIONS[0])
    answer = mmlens.analysis.answer_token_ids(model, inp, "blue")
    cam = mmlens.analysis.llava_cam(
        model, inp, "blue", layers=[0, "vision.blocks.0"], noise_std=0, progress=False
    )
    ids, _ = reference_ids(reference_tokenizer, image_files[:1], QUESTIONS[:1])
    forced = torch.cat([ids, torch.tensor([answer])], dim=1)
    visual = reference.transformer.visual
    modules = [visual.transformer.resblocks[0].ln_2, reference.transformer.h[0].ln_2]
    outputs, patterns = [], []
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in modules]
    attention = visual.attn_pool.attn
    handles.append(
        attention.register_forward_hook(lambda m, a, out: patterns.append(out[1])),
    )
    try:
        logits, _ = reference(forced)
    finally:
        for handle in handles:
            handle.remove()
    n_prompt = ids.shape[1]
    target = logits[0, n_prompt - 1 + torch.arange(len(answer)), forced[0, n_prompt:]].sum()
    vision_out, decoder_out = outputs
    vision_grad, decoder_grad = torch.autograd.grad(target, [vision_out, decoder_out])
    queries = inp.positions("image")
    relevance = (decoder_out[0, queries].detach() @ decoder_grad[0, queries].mean(0)).relu()
    spread = patterns[0][0].detach()  # nn.MultiheadAttention averages over heads: [query, patch]
    decoder_map = (relevance @ spread).reshape(6, 6)
    vision_map = (vision_out[0].detach() @ vision_grad[0].mean(0)).relu().reshape(6, 6)
    expected = torch.stack([decoder_map, vision_map])
    expected = expected / expected.amax((1, 2), keepdim=True).clamp_min(1e-30)
    assert expected.flatten(1).std(1).min() > 0.05
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)


def test_the_papers_presets_prepare_its_chat_format(model, images):
    for preset in (CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE):
        inp = model.prepare(images[0], "Is the door red?", preset=preset)
        assert inp.settings["tokenization"] == "hf" and inp.settings["template"] == "qwen_vl_chat"
        assert inp.prompts[0].startswith("<|im_start|>system\nYou are a helpful assistant.")
        assert tuple(inp.pixel_values.shape[-2:]) == (84, 84)  # the release's square input
        preset.check_input(model, inp)


def test_the_runner_and_the_report_run_on_it(folder, model, tmp_path):
    from mmlens.report import write_report
    from mmlens.zoo.shapes import generate

    result = mmlens.run(
        "knockout", folder, "shapes:3", tmp_path / "run", window_size=1, progress=False
    )
    assert set(result.flow) >= {"Image→Last", "Question→Last"} and len(result) > 0
    path = write_report(model, generate(3, seed=1), tmp_path / "report.html", progress=False)
    assert "LLaVA-CAM" in path.read_text()


def test_two_images_in_one_prompt_and_a_text_only_item_match_the_release(
    model, reference, images, image_files, reference_tokenizer
):
    question = "Picture 1: <img></img>\nPicture 2: <img></img>\nWhich is brighter?"
    inp = model.prepare([images, None], [question, "Hello there"])
    assert inp.n_images == 2 and len(inp.positions("image")) == 32
    assert len(inp.positions("image", item=1)) == 0
    paths = [f"Picture {n + 1}: <img>{path}</img>\n" for n, path in enumerate(image_files)]
    rows = [
        reference_tokenizer.make_context("".join(paths) + "Which is brighter?"),
        reference_tokenizer.make_context("Hello there"),
    ]
    with torch.no_grad():
        for item, row in enumerate(rows):
            expected, _ = reference(torch.tensor([row]))
            logits = model(inp.item(item))
            assert (logits - expected).abs().max() < 1e-4
            assert (model(inp)[item, -1] - expected[0, -1]).abs().max() < 1e-4
