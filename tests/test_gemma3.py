"""Gemma 3 on a random checkpoint of that architecture (`build_tiny_gemma3`: 4 decoder layers,
local and global alternating, a sliding window of 24 positions, shorter than every prompt
here, 16 image tokens per image): parity with HF's `Gemma3ForConditionalGeneration` (logits and
the residual stream entering every decoder layer, a left-padded batch of two images of
different sizes, greedy generation), `prepare` against HF's processor and chat template, that
what Gemma 3 adds matters (windows, the two rotary tables, the bidirectional image blocks),
pruning against knockout with windows and image blocks, the knockout engine and a suffix run
starting inside an image block against full runs, LLaVA-CAM against Grad-CAM through HF."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, Gemma3ForConditionalGeneration

import mmlens
from mmlens.ablations import attention_knockout, drop_tokens
from mmlens.analysis import knockout_sweep, llava_cam
from mmlens.inputs.templates import render
from mmlens.models.family import VisionLanguageFamily
from mmlens.models.gemma3 import HookedGemma3
from mmlens.testing import (
    build_tiny_gemma3,
    hf_answer_gradients,
    hf_gemma3_inputs,
    hf_position_ids,
    make_test_image,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.fixture(scope="module")
def hf(folder):
    return Gemma3ForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    # Squashed to 32 x 32 px: 8 x 8 patches of 4 px, pooled 2 x 2 to 4 x 4 image tokens.
    return {"square": make_test_image(56, 56, 1), "wide": make_test_image(88, 48, 2)}


def largest_difference(hf, model, inp, hf_kwargs=None) -> float:
    """Logits, the residual stream entering every decoder layer and the final norm's output,
    at real positions, against HF's (with HF `generate`'s position ids)."""
    kwargs = hf_gemma3_inputs(model, inp) if hf_kwargs is None else hf_kwargs
    with torch.no_grad():
        out = hf(
            **kwargs, position_ids=hf_position_ids(inp.attention_mask), output_hidden_states=True
        )
        logits, cache = model.run_with_cache(inp)
    real = inp.attention_mask.bool()
    differences = [(out.logits - logits)[real].abs().max()]
    for layer in range(model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        differences.append((out.hidden_states[layer] - resid)[real].abs().max())
    final = cache["ln_final.hook_normalized"]
    differences.append((out.hidden_states[-1] - final)[real].abs().max())
    assert logits.std() > 0.5, "random checkpoint too flat for parity to mean anything"
    return float(max(differences))


def test_loads_as_gemma3_and_satisfies_the_contract(model, images):
    assert type(model) is HookedGemma3 and isinstance(HookedGemma3, VisionLanguageFamily)
    cfg = model.cfg
    assert cfg.layer_types == ["sliding_attention", "full_attention"] * 2
    assert [cfg.layer_window(layer) for layer in range(4)] == [24, None, 24, None]
    assert cfg.norm_unit_offset and cfg.sandwich_norms and cfg.qk_norm
    assert cfg.embed_scale == 64**0.5 and cfg.attn_scale == 24**-0.5
    assert model.layer_rotary["full_attention"].inv_freq[1] != model.rotary.inv_freq[1] * 100
    inp = model.prepare(images["square"], "What colour is the star?")
    assert inp.image_geometry[0].grid_size == (4, 4) and len(inp.positions("image")) == 16
    assert model.token_patch_size == 8
    assert inp.input_ids.shape[1] > cfg.sliding_window  # the windows bite
    names = set(model.hook_dict)
    assert {
        "blocks.0.ln1_post.hook_normalized",
        "blocks.0.ln2_post.hook_normalized",
        "blocks.0.attn.q_norm.hook_normalized",
        "projector.hook_pooled",
        "projector.mm_soft_emb_norm.hook_normalized",
        "vision.ln_post.hook_normalized",
    } <= names


def test_the_template_is_the_chat_templates_prompt(folder):
    rendered = render("gemma3", "What colour is the door?", n_images=1, image_token="<I>")
    assert rendered.text == (
        "<start_of_turn>user\n<I>What colour is the door?<end_of_turn>\n<start_of_turn>model\n"
    )
    processor = AutoProcessor.from_pretrained(folder)
    for system in (None, "Be brief."):
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Why?"}],
            }
        ]
        if system is not None:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        expected = processor.apply_chat_template(messages, add_generation_prompt=True)
        ours = render("gemma3", "Why?", n_images=1, system=system, image_token="<start_of_image>")
        assert processor.tokenizer.bos_token + ours.text == expected


def test_prepare_gives_what_hfs_processor_and_chat_template_give(model, folder, images):
    processor = AutoProcessor.from_pretrained(folder)
    questions = ["What colour is the star in the corner?", "Why?"]
    pictures = [images["wide"], images["square"]]
    inp = model.prepare(pictures, questions)
    for item, (picture, question) in enumerate(zip(pictures, questions, strict=True)):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": picture},
                    {"type": "text", "text": question},
                ],
            }
        ]
        expected = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt",
        )  # fmt: skip
        alone = inp.item(item)
        real = alone.attention_mask[0].bool()
        assert torch.equal(alone.input_ids[0, real], expected["input_ids"][0])
        assert torch.equal(alone.pixel_values, expected["pixel_values"])
        assert torch.equal(
            hf_gemma3_inputs(model, alone)["token_type_ids"][0, real],
            expected["token_type_ids"][0],
        )
    # The segments: the question's characters, the image block, the last prompt token.
    assert model.to_string(inp.input_ids[1, inp.positions("question", item=1)]) == "Why?"
    assert model.to_string(inp.input_ids[0, inp.positions("last")]) == "\n"


def test_one_image_matches_hf(hf, model, images):
    inp = model.prepare(images["square"], "What colour is the star?")
    assert largest_difference(hf, model, inp) < TOLERANCE


def test_padded_batch_of_two_image_sizes_matches_hf(hf, model, images):
    inp = model.prepare(
        [images["wide"], images["square"]], ["What colour is the star in the corner?", "Why?"]
    )
    assert not inp.attention_mask.bool().all()  # left-padded
    assert largest_difference(hf, model, inp) < TOLERANCE


def test_windows_rotary_tables_and_image_blocks_matter(hf, model, images):
    inp = model.prepare(images["wide"], "What colour is the star in the corner?")
    # HF without token types has no bidirectional blocks: far from both.
    causal_only = {k: v for k, v in hf_gemma3_inputs(model, inp).items() if k != "token_type_ids"}
    assert largest_difference(hf, model, inp, causal_only) > 1e-2
    original = model.attention_groups
    model.attention_groups = lambda **inputs: None
    try:
        assert largest_difference(hf, model, inp, causal_only) < TOLERANCE
    finally:
        model.attention_groups = original
    window = model.cfg.sliding_window
    model.cfg.sliding_window = None  # the local layers without their window
    try:
        assert largest_difference(hf, model, inp) > 1e-3
    finally:
        model.cfg.sliding_window = window
    layer_types = model.cfg.layer_types
    model.cfg.layer_types = ["full_attention"] * 4  # no windows, one rotary table
    try:
        assert largest_difference(hf, model, inp) > 1e-3
    finally:
        model.cfg.layer_types = layer_types
    local = model.layer_rotary["sliding_attention"]
    model.layer_rotary["sliding_attention"] = model.layer_rotary["full_attention"]
    try:
        assert largest_difference(hf, model, inp) > 1e-3
    finally:
        model.layer_rotary["sliding_attention"] = local


def test_two_images_in_one_prompt_are_two_blocks_and_match_hf(hf, model, images):
    question = "Is <start_of_image> like <start_of_image>?"
    inp = model.prepare([[images["square"], images["wide"]], None], [question, "Hello"])
    assert inp.n_images == 2 and len(inp.positions("image")) == 32
    groups = model.attention_groups(inp.input_ids)
    assert groups[0, inp.positions("image")].tolist() == [0] * 16 + [1] * 16
    assert bool((groups[1] == -1).all())
    assert largest_difference(hf, model, inp) < TOLERANCE
    # 88 x 48 squashed to 32 x 32: x < 28 -> columns 0..1 (8 px cells), y < 28 -> rows 0..2.
    assert len(inp.patches_in_box((0, 0, 28, 28), image=1)) == 6


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_hf(hf, model, images, batch):
    prompts = ["What colour is the star?", "Why?"][:batch]
    inp = model.prepare([images["square"], images["wide"]][:batch], prompts)
    ours = model.generate(inp, max_new_tokens=6, stop_at_eos=False)
    with torch.no_grad():
        theirs = hf.generate(
            **hf_gemma3_inputs(model, inp), max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
    assert torch.equal(ours, theirs)


def test_dropping_image_tokens_equals_knocking_them_out_with_windows(model, images):
    # Drop half of the image block from layer 1: every position left (later image tokens,
    # which attended to them bidirectionally, and the text) must see exactly what a knockout
    # of the dropped keys leaves, with windows counted in original positions (dropping does
    # not let a local layer's window reach further back).
    inp = model.prepare(images["wide"], "What colour is the star in the corner?")
    image = inp.positions("image")
    dropped_set = image[::2]
    survivors = torch.tensor(
        [p for p in range(inp.input_ids.shape[1]) if p not in set(dropped_set.tolist())]
    )
    layer = 1
    dropped = model.run_with_hooks(inp, fwd_hooks=drop_tokens(dropped_set, from_layer=layer))
    targets = survivors[survivors > int(image[0])]
    knocked = model.run_with_hooks(
        inp,
        fwd_hooks=attention_knockout(dropped_set, targets, range(layer, model.cfg.n_layers)),
    )
    assert dropped.shape[1] == len(survivors)
    torch.testing.assert_close(dropped[0, -1], knocked[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(dropped[0], knocked[0, survivors], atol=1e-4, rtol=0)
    # A window counted over the rows left would reach further back: not the same.
    last = inp.input_ids.shape[1] - 1
    assert last - int(image[0]) >= model.cfg.sliding_window


def test_the_knockout_sweep_engine_equals_full_runs(model, images):
    inp = model.prepare([images["square"], images["wide"]], ["What colour is the star?", "Why?"])
    kwargs = dict(window_size=1, progress=False)
    engine = knockout_sweep(model, inp, method="engine", **kwargs)
    naive = knockout_sweep(model, inp, method="naive", **kwargs)
    assert {"Image→Last", "Image→Question"} <= set(engine["flow"])
    assert (engine["p_new"] - naive["p_new"]).abs().max() < 1e-5


def test_a_suffix_starting_inside_an_image_block_equals_a_full_run(model, images):
    # Knocking out attention from the second half of the image to the text before it changes
    # the first half too (it reads the second half), so the suffix run starts at the block.
    inp = model.prepare(images["wide"], "What colour is the star?")
    image = inp.positions("image")
    second_half = image[len(image) // 2 :]
    hooks = attention_knockout(torch.arange(1, int(image[0])), second_half, [1, 2])
    prefix = model.run_prefix(inp)
    start = int(second_half[0])
    suffix = model.run_suffix(prefix, start, entry_layers=[1], fwd_hooks=hooks)
    full = model.run_with_hooks(inp, fwd_hooks=hooks)
    assert suffix.shape[1] == inp.input_ids.shape[1] - start
    torch.testing.assert_close(suffix[0], full[0, start:], atol=1e-4, rtol=0)
    last = model.run_suffix(prefix, start, entry_layers=[1], fwd_hooks=hooks, only_last=True)
    torch.testing.assert_close(last[0], full[0, -1], atol=1e-4, rtol=0)
    assert (full[0, -1] - prefix.logits[0, -1]).abs().max() > 1e-3  # the knockout did something


def test_llava_cam_equals_grad_cam_through_hf(hf, model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    answer = "red car"
    cam = llava_cam(model, inp, answer, layers=[0, "vision.blocks.0"], noise_std=0)
    forced = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, answer))
    tower = hf.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    modules = [
        tower.encoder.layers[0].layer_norm2,
        hf.model.language_model.layers[0].pre_feedforward_layernorm,  # mmlens' ln2
    ]
    kwargs = hf_gemma3_inputs(model, forced)
    outputs, gradients = hf_answer_gradients(hf, kwargs, modules, inp.input_ids.shape[1])
    vision = outputs[0][0].detach()  # [patch, d_vision], row-major 8 x 8
    vision_map = (vision @ gradients[0][0].mean(0)).relu().reshape(8, 8)
    image = inp.positions("image")
    tokens, token_grad = outputs[1][0, image].detach(), gradients[1][0, image]
    cells = (tokens @ token_grad.mean(0)).relu().reshape(4, 4)
    expected = torch.stack([cells.repeat_interleave(2, 0).repeat_interleave(2, 1), vision_map])
    expected = expected / expected.amax((1, 2), keepdim=True)
    assert expected.flatten(1).std(1).min() > 0.05  # maps with structure, not flat
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)


def test_an_item_of_a_batch_with_a_text_only_one_equals_it_alone(model, images):
    inp = model.prepare([images["square"], None, images["wide"]], ["Why?", "Hi", "Is it red?"])
    full = model(inp)
    for index in range(3):
        alone = model(inp.item(index))
        torch.testing.assert_close(alone[0, -1], full[index, -1], atol=1e-4, rtol=0)


def test_generation_with_image_tokens_dropped_equals_a_full_pass_with_them_dropped(model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    n, new = inp.input_ids.shape[1], 4
    hooks = drop_tokens(inp.positions("image")[::2], from_layer=1)
    with model.hooks(fwd_hooks=hooks):
        generated = model.generate(inp, max_new_tokens=new, stop_at_eos=False)
        forced = model(inp.with_tokens(generated[:, n:]))
    assert torch.equal(forced[:, -new - 1 : -1].argmax(-1), generated[:, n:])


@pytest.fixture(scope="module")
def pan_and_scan(folder):
    """The model with pan-and-scan on; crops of at least 64 px (HF's default 256 exceeds
    these small test images)."""
    scanning = mmlens.from_pretrained(folder)
    scanning.set_pan_and_scan(pan_and_scan_min_crop_size=64)
    return scanning


@pytest.fixture(scope="module")
def scan_images():
    # 600 x 200 -> 3 crops side by side; 56 x 56 -> none; 120 x 400 -> 3 crops stacked.
    return [make_test_image(600, 200, 3), make_test_image(56, 56, 1), make_test_image(120, 400, 4)]


SCAN_QUESTIONS = ["What colour is the star?", "Why?", "Is it red?"]


@pytest.mark.parametrize(
    "size", [(200, 600), (600, 200), (300, 320), (100, 1000), (90, 800), (700, 250), (64, 64)]
)
def test_pan_and_scan_crops_are_hfs(size):
    import numpy as np
    from transformers import Gemma3ImageProcessorPil

    from mmlens.models.gemma3.processor import pan_and_scan_boxes

    height, width = size
    image = np.arange(height * width * 3, dtype=np.float32).reshape(3, height, width)
    crops = Gemma3ImageProcessorPil().pan_and_scan(image, 64, 4, 1.2)
    boxes = pan_and_scan_boxes(size, 64, 4, 1.2)
    assert len(crops) == len(boxes)
    for crop, (x0, y0, x1, y1) in zip(crops, boxes, strict=True):
        assert np.array_equal(crop, image[:, y0:y1, x0:x1])


def test_pan_and_scan_gives_what_hfs_processor_gives(pan_and_scan, folder, scan_images):
    processor = AutoProcessor.from_pretrained(folder)
    inp = pan_and_scan.prepare(scan_images, SCAN_QUESTIONS)
    assert [geometry.n_crops for geometry in inp.image_geometry] == [4, 1, 4]
    assert inp.pixel_values.shape[0] == 9  # every image, then its crops
    for item, (picture, question) in enumerate(zip(scan_images, SCAN_QUESTIONS, strict=True)):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": picture},
                    {"type": "text", "text": question},
                ],
            }
        ]
        expected = processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", images_kwargs={"do_pan_and_scan": True,
                                                "pan_and_scan_min_crop_size": 64},
        )  # fmt: skip
        alone = inp.item(item)
        real = alone.attention_mask[0].bool()
        assert torch.equal(alone.input_ids[0, real], expected["input_ids"][0])
        assert torch.equal(alone.pixel_values, expected["pixel_values"])
    assert pan_and_scan.to_string(inp.input_ids[0, inp.positions("question")]) == SCAN_QUESTIONS[0]
    # Each view of an image is a block of its own: the image, then each crop.
    groups = pan_and_scan.attention_groups(inp.input_ids)[0, inp.positions("image")]
    assert groups.tolist() == [view for view in range(4) for _ in range(16)]
    # An input prepared with pan-and-scan off (the checkpoint as saved) is refused.
    plain = mmlens.from_pretrained(folder).prepare(scan_images[1], "Why?")
    with pytest.raises(ValueError, match="different processor"):
        pan_and_scan(plain)


def test_pan_and_scan_matches_hf_and_generates_as_hf(hf, pan_and_scan, scan_images):
    inp = pan_and_scan.prepare(scan_images, SCAN_QUESTIONS)
    assert largest_difference(hf, pan_and_scan, inp) < TOLERANCE
    ours = pan_and_scan.generate(inp, max_new_tokens=5, stop_at_eos=False)
    with torch.no_grad():
        theirs = hf.generate(
            **hf_gemma3_inputs(pan_and_scan, inp), max_new_tokens=5, min_new_tokens=5,
            do_sample=False,
        )  # fmt: skip
    assert torch.equal(ours, theirs)
    full = pan_and_scan(inp)
    for index in range(3):  # an item's pixels are its image's rows: the image and its crops
        alone = pan_and_scan(inp.item(index))
        torch.testing.assert_close(alone[0, -1], full[index, -1], atol=1e-4, rtol=0)


def test_pan_and_scan_layout_boxes_and_cam(pan_and_scan, scan_images):
    inp = pan_and_scan.prepare(scan_images[0], SCAN_QUESTIONS[0])
    layout = inp.layout
    assert layout.tile.unique().tolist() == [0, 1, 2, 3]
    crops = layout.tile >= 1  # three 4 x 4 grids side by side
    assert (int(layout.row[crops].max()), int(layout.col[crops].max())) == (3, 11)
    # 600 x 200 -> crops of x 0..200, 200..400, 400..600. The box x < 300, y < 100 covers the
    # whole image's columns 0..1 and rows 0..1, all of crop 1's columns and half of crop 2's
    # (columns 4..5 side by side), rows 0..1 of both.
    found = inp.patches_in_box((0, 0, 300, 100))
    base = layout.position[(layout.tile == 0) & (layout.row < 2) & (layout.col < 2)]
    tiles = layout.position[crops & (layout.row < 2) & (layout.col < 6)]
    assert found.tolist() == sorted(base.tolist() + tiles.tolist()) and len(found) == 16
    cam = llava_cam(pan_and_scan, inp, "red", layers=[0, "vision.blocks.0"], noise_std=0)
    assert cam.maps.shape == (2, 8, 8)  # on the whole image's view
    row, index = pan_and_scan.vision_patch_index(inp, 0)
    assert row == 0 and index.shape == (8, 8)


def test_the_hub_releases_processor_files_load(folder, tmp_path, images):
    # The hub releases keep the image processor in preprocessor_config.json (with HF's
    # image-processor class name) and only the sequence length in processor_config.json.
    import json
    import shutil

    release = tmp_path / "release-layout"
    shutil.copytree(folder, release)
    saved = json.loads((release / "processor_config.json").read_text())
    settings = {**saved.pop("image_processor"), "image_processor_type": "Gemma3ImageProcessor",
                "processor_class": "Gemma3Processor", "do_pan_and_scan": None}  # fmt: skip
    (release / "preprocessor_config.json").write_text(json.dumps(settings))
    (release / "processor_config.json").write_text(json.dumps(saved))
    model = mmlens.from_pretrained(release)
    ours = mmlens.from_pretrained(folder)
    inp = model.prepare(images["wide"], "Why?")
    assert torch.equal(inp.input_ids, ours.prepare(images["wide"], "Why?").input_ids)
    assert not model.processor.pan_and_scan


def test_soft_caps_are_ignored_as_hfs_multimodal_model_ignores_them(tmp_path, images):
    # Gemma3ForConditionalGeneration caps neither logits nor attention scores, whatever the
    # config says (only the text-only Gemma3ForCausalLM caps logits); the releases set null.
    folder = build_tiny_gemma3(tmp_path / "capped", final_logit_softcapping=3.0, n_layers=2)
    hf = Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    model = mmlens.from_pretrained(folder)
    inp = model.prepare(images["square"], "Why?")
    with torch.no_grad():
        assert model(inp).abs().max() > 3.0
    assert largest_difference(hf, model, inp) < TOLERANCE


def test_the_papers_presets_prepare_its_chat_format(model, images):
    from mmlens.presets import CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE

    for preset in (CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE):
        inp = model.prepare(images["wide"], "Is the door red?", preset=preset)
        assert inp.settings["template"] == "gemma3" and inp.settings["tokenization"] == "hf"
        assert "<start_of_turn>user\n" in inp.prompts[0]
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
