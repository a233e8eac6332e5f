"""Qwen2-VL on a random checkpoint of that architecture (`build_tiny_qwen2_vl`): the inputs
against HF's image processor and the chat template, parity with HF's model (logits and every
residual, one image and a left-padded batch of two images of different sizes, greedy
generation with M-RoPE's rope deltas), the layout and boxes on the merged grid, and pruning
against knockout with 3-D positions."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

import mmlens
from mmlens.ablations import attention_knockout, drop_tokens
from mmlens.analysis import knockout_sweep, llava_cam
from mmlens.models.family import ImageTokenGeometry, VisionLanguageFamily
from mmlens.models.qwen2_vl import HookedQwen2VL, mrope_positions
from mmlens.presets import CROSS_MODAL_FLOW
from mmlens.testing import build_tiny_qwen2_vl, make_test_image

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("qwen2-vl"))


@pytest.fixture(scope="module")
def hf(folder):
    return Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    # 56 x 56: 8 x 8 patches, 4 x 4 cells; 90 x 40 resized to 84 x 42: 6 x 12 patches.
    return {"square": make_test_image(56, 56, 1), "wide": make_test_image(90, 40, 2)}


def hf_kwargs(model, inp) -> dict:
    """HF's inputs for `inp`: exactly mmlens' ids, mask, pixels and grids, and the token types
    HF's processor would give (1 at image tokens)."""
    kwargs = inp.model_kwargs()
    kwargs["mm_token_type_ids"] = (kwargs["input_ids"] == model.cfg.image_token_id).int()
    return kwargs


def assert_matches_hf(hf, model, inp) -> float:
    """Logits and every layer's residual stream at real positions within TOLERANCE of HF's
    (which computes its own 3-D positions); returns the largest difference."""
    with torch.no_grad():
        out = hf(**hf_kwargs(model, inp), output_hidden_states=True)
        logits, cache = model.run_with_cache(inp)
    real = inp.attention_mask.bool()
    differences = [(out.logits - logits)[real].abs().max()]
    for layer in range(model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        differences.append((out.hidden_states[layer] - resid)[real].abs().max())
    differences.append(
        (out.hidden_states[-1] - cache["ln_final.hook_normalized"])[real].abs().max()
    )
    assert logits.std() > 0.5, "random checkpoint too flat for parity to mean anything"
    largest = float(max(differences))
    assert largest < TOLERANCE, differences
    return largest


def test_loads_as_qwen2_vl_and_satisfies_the_contract(model, images):
    assert type(model) is HookedQwen2VL and isinstance(HookedQwen2VL, VisionLanguageFamily)
    assert model.token_patch_size == 14 and model.default_template == "qwen2_vl"
    assert model.rotary.sections == (2, 3, 3)
    inp = model.prepare(images["square"], "What colour is the star?")
    assert isinstance(inp.image_geometry[0], ImageTokenGeometry)
    names = set(model.hook_dict)
    assert {
        "vision.hook_embed",
        "vision.blocks.1.attn.hook_rot_q",
        "vision.blocks.0.mlp.hook_post",
        "vision.hook_features",
        "merger.hook_merged",
        "hook_image_embeds",
    } <= names
    _, cache = model.run_with_cache(inp, names_filter=["vision.hook_features", "hook_image_embeds"])
    assert cache["vision.hook_features"].shape == (1, 64, 32)
    assert cache["hook_image_embeds"].shape == (1, 16, model.cfg.d_model)


def test_prepare_gives_hf_image_processor_pixels_and_the_chat_template(folder, model, images):
    question = "What colour is the star?"
    inp = model.prepare([images["square"], images["wide"]], [question, "Why?"])
    reference = Qwen2VLImageProcessorPil.from_pretrained(folder)(
        [images["square"], images["wide"]], return_tensors="pt"
    )
    assert torch.equal(inp.pixel_values, reference["pixel_values"])
    assert inp.extra_inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 12]]
    assert torch.equal(inp.extra_inputs["image_grid_thw"], reference["image_grid_thw"])
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What colour is the star?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert inp.prompts[0] == expected
    ids = model.tokenizer(expected.replace("<|image_pad|>", "<|image_pad|>" * 16))["input_ids"]
    real = inp.attention_mask[0].bool()
    assert inp.input_ids[0][real].tolist() == ids
    assert int((inp.input_ids[1] == model.cfg.image_token_id).sum()) == 18  # 3 x 6 cells
    assert model.to_string(inp.input_ids[0, inp.positions("question", 0)]) == question
    assert model.to_string(inp.input_ids[0, inp.positions("last", 0)]) == "\n"


def test_rope_index_matches_hf(hf, model, images):
    inp = model.prepare([images["square"], images["wide"]], ["What colour is the star?", "Why?"])
    kwargs = hf_kwargs(model, inp)
    hf_positions, hf_deltas = hf.model.get_rope_index(
        kwargs["input_ids"],
        kwargs["mm_token_type_ids"],
        image_grid_thw=kwargs["image_grid_thw"],
        attention_mask=kwargs["attention_mask"],
    )
    ours, deltas = mrope_positions(
        inp.input_ids,
        inp.attention_mask,
        kwargs["image_grid_thw"],
        image_token_id=model.cfg.image_token_id,
    )
    real = inp.attention_mask.bool()
    assert torch.equal(ours[:, real], hf_positions[:, real])
    assert deltas.tolist() == hf_deltas.flatten().tolist() and min(deltas.tolist()) < 0
    from_model = model.position_ids(
        inp.attention_mask, input_ids=inp.input_ids, image_grid_thw=kwargs["image_grid_thw"]
    )
    assert torch.equal(from_model[:, real], ours[:, real])


def test_one_image_matches_hf(hf, model, images):
    assert_matches_hf(hf, model, model.prepare(images["square"], "What colour is the star?"))


def test_padded_batch_of_two_image_sizes_matches_hf(hf, model, images):
    inp = model.prepare(
        [images["wide"], images["square"]], ["What colour is the star in the corner?", "Why?"]
    )
    assert not inp.attention_mask.bool().all()  # left-padded
    assert_matches_hf(hf, model, inp)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_hf(hf, model, images, batch):
    prompts = ["What colour is the star?", "Why?"][:batch]
    inp = model.prepare([images["square"], images["wide"]][:batch], prompts)
    ours = model.generate(inp, max_new_tokens=5, stop_at_eos=False)
    with torch.no_grad():
        theirs = hf.generate(
            **hf_kwargs(model, inp), max_new_tokens=5, min_new_tokens=5, do_sample=False
        )
    assert torch.equal(ours, theirs)


def test_generation_steps_continue_from_the_rope_delta(model, images):
    inp = model.prepare(images["square"], "Why?")
    n = inp.input_ids.shape[1]
    _, deltas = model.rope_index(
        inp.input_ids, inp.attention_mask, inp.extra_inputs["image_grid_thw"]
    )
    step = model.position_ids(torch.ones(1, n + 1, dtype=torch.long), rope_deltas=deltas)
    assert step[:, 0, -1].tolist() == [n + int(deltas[0])] * 3
    # The same token teacher-forced in a full pass sits where the step put it.
    forced = torch.cat((inp.input_ids, inp.input_ids[:, -1:]), dim=1)
    full = model.position_ids(
        torch.ones_like(forced), input_ids=forced, image_grid_thw=inp.extra_inputs["image_grid_thw"]
    )
    assert torch.equal(full[:, :, -1], step[:, :, -1])


def test_the_layout_has_one_token_per_merged_cell(model, images):
    inp = model.prepare([images["square"], images["wide"]], ["Why?", "Why?"])
    assert inp.image_geometry[0].grid_size == (4, 4) and inp.image_geometry[1].grid_size == (3, 6)
    assert inp.image_geometry[1].processed_size == (42, 84)
    grid = inp.layout.patch_grid(1)
    assert tuple(grid.shape) == (3, 6)
    assert sorted(grid.flatten().tolist()) == inp.positions("image", 1).tolist()


def test_boxes_select_merged_cells(model, images):
    inp = model.prepare(images["square"], "Why?")  # 56 x 56 kept: 4 x 4 cells of 14 px
    grid = inp.layout.patch_grid(0)
    assert inp.patches_in_box((0, 0, 14, 14)).tolist() == [int(grid[0, 0])]
    assert inp.patches_in_box((28, 0, 56, 28)).tolist() == sorted(grid[:2, 2:].flatten().tolist())
    wide = model.prepare(images["wide"], "Why?")  # 90 x 40 -> 84 x 42: 3 x 6 cells
    grid = wide.layout.patch_grid(0)
    # x 0..45 -> 0..42 (cells 0-2), y 0..20 -> 0..21 (cells 0-1)
    assert wide.patches_in_box((0, 0, 45, 20)).tolist() == sorted(grid[:2, :3].flatten().tolist())


def test_dropping_the_image_equals_knocking_it_out_with_3d_positions(model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    image = inp.positions("image")
    after = torch.arange(int(image[-1]) + 1, inp.input_ids.shape[1])
    layer = 1
    dropped = model.run_with_hooks(inp, fwd_hooks=drop_tokens(image, from_layer=layer))
    knocked = model.run_with_hooks(
        inp, fwd_hooks=attention_knockout(image, after, range(layer, model.cfg.n_layers))
    )
    assert dropped.shape[1] == inp.input_ids.shape[1] - len(image)
    torch.testing.assert_close(dropped[:, -1], knocked[:, -1], atol=1e-5, rtol=0)
    plain = model(inp)
    assert (plain[:, -1] - knocked[:, -1]).abs().max() > 1e-3  # the image mattered


def test_an_item_of_a_batch_keeps_its_image_patches_and_grid(model, images):
    inp = model.prepare([images["square"], None, images["wide"]], ["Why?", "Hi", "Is it red?"])
    assert inp.pixel_rows == [64, 72]
    for index, image in ((0, "square"), (2, "wide")):
        alone = model.prepare(images[image], ["Why?", "Hi", "Is it red?"][index])
        item = inp.item(index)
        assert torch.equal(item.pixel_values, alone.pixel_values)
        assert torch.equal(
            item.extra_inputs["image_grid_thw"], alone.extra_inputs["image_grid_thw"]
        )
        assert torch.equal(item.input_ids, alone.input_ids)
        torch.testing.assert_close(model(item)[0, -1], model(inp)[index, -1], atol=1e-4, rtol=0)
    text = inp.item(1)
    assert text.pixel_values is None and "image_grid_thw" not in text.extra_inputs
    assert model(text).shape[:2] == text.input_ids.shape


def test_the_knockout_sweep_engine_equals_full_runs_with_3d_positions(model, images):
    inp = model.prepare(images["square"], "What colour is the star?", preset=CROSS_MODAL_FLOW)
    kwargs = dict(boxes=[[(0, 0, 28, 28)]], preset=CROSS_MODAL_FLOW, progress=False)
    kwargs["patch_rule"] = "geometric"  # the preset's mask rule reads pixels as images
    engine = knockout_sweep(model, inp, method="engine", **kwargs)
    naive = knockout_sweep(model, inp, method="naive", **kwargs)
    assert {"Related patches→Question", "Image→Last"} <= set(engine["flow"])
    assert (engine["p_new"] - naive["p_new"]).abs().max() < 1e-5
    with pytest.raises(ValueError, match="rows of flattened patches"):
        inp.patches_in_box((0, 0, 28, 28), rule="mask")


def test_generation_with_the_image_dropped_equals_a_full_pass_with_it_dropped(model, images):
    # The cached steps (3-D positions continued by the rope delta, a pruned KV cache) against
    # one teacher-forced pass over prompt and answer (positions from the whole sequence).
    inp = model.prepare(images["wide"], "What colour is the star?")
    n, new = inp.input_ids.shape[1], 4
    hooks = drop_tokens(inp.positions("image"), from_layer=1)
    with model.hooks(fwd_hooks=hooks):
        generated = model.generate(inp, max_new_tokens=new, stop_at_eos=False)
        forced = model(inp.with_tokens(generated[:, n:]))
    assert torch.equal(forced[:, -new - 1 : -1].argmax(-1), generated[:, n:])


def test_the_runner_runs_on_it_and_llava_cam_says_it_does_not(folder, model, images, tmp_path):
    result = mmlens.run(
        "knockout", folder, "shapes:3", tmp_path / "run", window_size=1, progress=False
    )
    assert set(result.flow) >= {"Image→Last", "Question→Last"} and len(result) > 0
    inp = model.prepare(images["square"], "What colour is the star?")
    with pytest.raises(ValueError, match="rows of flattened patches"):
        llava_cam(model, inp, "red", layers=[0], noise_std=0, progress=False)


def test_two_images_in_one_prompt_match_hf(hf, model, images):
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    inp = model.prepare([images["square"], images["wide"]], f"Is {image} the same as {image}?")
    assert inp.n_images == 2 and len(inp.positions("image")) == 16 + 18
    assert_matches_hf(hf, model, inp)
