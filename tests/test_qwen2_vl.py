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
from mmlens.testing import (
    build_tiny_qwen2_vl,
    hf_answer_gradients,
    hf_qwen_vl_inputs,
    make_test_image,
)

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


def assert_matches_hf(hf, model, inp) -> float:
    """Logits and every layer's residual stream at real positions within TOLERANCE of HF's
    (which computes its own 3-D positions); returns the largest difference."""
    with torch.no_grad():
        out = hf(**hf_qwen_vl_inputs(model, inp), output_hidden_states=True)
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
    kwargs = hf_qwen_vl_inputs(model, inp)
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
            **hf_qwen_vl_inputs(model, inp), max_new_tokens=5, min_new_tokens=5, do_sample=False
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
    engine = knockout_sweep(model, inp, method="engine", **kwargs)
    naive = knockout_sweep(model, inp, method="naive", **kwargs)
    # The preset's painted-mask rule reads pixels as images: the geometric rule, noted.
    assert engine.attrs["patch_rule"] == "geometric" and "rows" in engine.attrs["patch_rule_note"]
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


def test_the_runner_runs_on_it(folder, tmp_path):
    result = mmlens.run(
        "knockout", folder, "shapes:3", tmp_path / "run", window_size=1, progress=False
    )
    assert set(result.flow) >= {"Image→Last", "Question→Last"} and len(result) > 0


def test_the_runner_under_the_cross_modal_preset_records_the_geometric_rule(folder, tmp_path):
    import json

    result = mmlens.run(
        "knockout", folder, "shapes:3", tmp_path, preset="cross_modal_flow", correct_only=False,
        centres=[0], window_size=1, progress=False,
    )  # fmt: skip
    assert {"Related patches→Question", "Other patches→Question"} <= set(result.flow)
    assert result["sample_id"].nunique() == 3
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["identity"]["options"]["patch_rule"] == "geometric"


def test_the_papers_presets_prepare_its_inputs(model, images):
    from mmlens.presets import REDUNDANCY_TO_RELEVANCE

    for preset in (CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE):
        inp = model.prepare(images["wide"], "Is the door red?", preset=preset)
        assert inp.settings["tokenization"] == "hf" and inp.settings["image_mode"] is None
        assert inp.prompts[0].startswith("<|im_start|>system")
        preset.check_input(model, inp)
        assert preset.patch_rule_for(model)[0] == "geometric"
    assert CROSS_MODAL_FLOW.patch_rule_for(model)[1]  # says why it is not the paper's mask
    assert REDUNDANCY_TO_RELEVANCE.patch_rule_for(model)[1] is None


def test_the_demo_report_runs_on_it(model, tmp_path):
    from mmlens.report import write_report
    from mmlens.zoo.shapes import generate

    path = write_report(model, generate(4, seed=1), tmp_path / "report.html", progress=False)
    html = path.read_text()
    assert "LLaVA-CAM" in html and "Related patches" in html and len(html) > 100_000


def test_two_images_in_one_prompt_match_hf(hf, model, images):
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    inp = model.prepare([images["square"], images["wide"]], f"Is {image} the same as {image}?")
    assert inp.n_images == 2 and len(inp.positions("image")) == 16 + 18
    assert_matches_hf(hf, model, inp)


def processor_row(row: int, col: int, width: int) -> int:
    """The ``pixel_values`` row of patch (row, col) of an image `width` patches wide, as HF's
    ``patchify`` orders them: 2 x 2 merge windows row-major, each window's patches row-major."""
    return ((row // 2) * (width // 2) + col // 2) * 4 + (row % 2) * 2 + col % 2


def test_llava_cam_equals_grad_cam_through_hf(hf, model, images):
    # 90 x 40 -> 84 x 42: 6 x 12 patches of 7 px, 3 x 6 merged cells (one image token each).
    inp = model.prepare(images["wide"], "What colour is the star?")
    answer = "red car"
    # Decoder layer 0 (the last layer's image positions reach the answer through no later
    # attention: its map is zero) and vision block 0, both through HF's modules.
    cam = llava_cam(model, inp, answer, layers=[0, "vision.blocks.0"], noise_std=0)
    forced = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, answer))
    modules = [
        hf.model.visual.blocks[0].norm2,
        hf.model.language_model.layers[0].post_attention_layernorm,
    ]
    outputs, gradients = hf_answer_gradients(
        hf, hf_qwen_vl_inputs(model, forced), modules, inp.input_ids.shape[1]
    )
    rows, cols = 6, 12
    order = torch.tensor([[processor_row(r, c, cols) for c in range(cols)] for r in range(rows)])
    vision = outputs[0].reshape(-1, outputs[0].shape[-1])[order.flatten()]
    vision_grad = gradients[0].reshape(-1, vision.shape[-1])[order.flatten()]
    vision_map = (vision.detach() @ vision_grad.mean(0)).relu().reshape(rows, cols)
    image = inp.positions("image")  # the merged cells, row-major
    tokens, token_grad = outputs[1][0, image], gradients[1][0, image]
    cell_map = (tokens.detach() @ token_grad.mean(0)).relu().reshape(rows // 2, cols // 2)
    decoder_map = cell_map.repeat_interleave(2, 0).repeat_interleave(2, 1)
    expected = torch.stack([decoder_map, vision_map])
    expected = expected / expected.amax((1, 2), keepdim=True)
    assert cam.maps.shape == (2, rows, cols) and cam.settings["cells_per_token"] == [2, 2]
    assert expected.flatten(1).std(1).min() > 0.05  # maps with structure, not flat
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)
    # The decoder map's values are the cells', each on its 2 x 2 patches.
    cells = cam.maps[0][::2, ::2]
    assert torch.equal(cam.maps[0], cells.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_llava_cam_pixels_and_noise_follow_hf_patch_layout(folder, model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    pixels = model.vision_pixels(inp)  # [C, H, W], put back together from the rows
    assert pixels.shape == (3, 42, 84)
    processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
    rows, _, _ = processor.patchify(
        pixels.numpy(), patch_size=7, merge_size=2, temporal_patch_size=2
    )
    assert torch.equal(torch.from_numpy(rows), inp.pixel_values)  # HF's patchify gives them back
    generator = torch.Generator().manual_seed(0)
    noise = model.pixel_noise(inp.pixel_values.repeat(30, 1), 0.1, generator)
    patches = noise.view(-1, 3, 2, 7, 7)  # HF's row: channel, frame, patch rows, patch columns
    assert torch.equal(patches[:, :, 0], patches[:, :, 1])  # a still image: frames alike
    image_std = torch.tensor(processor.image_std)
    per_channel = patches.transpose(0, 1).flatten(1).std(1)  # noise / image_std[channel]
    torch.testing.assert_close(per_channel, 0.1 / image_std, rtol=0.02, atol=0)


def test_smoothgrad_on_pixel_rows_is_seeded_and_drawn_over_the_image(model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    kwargs = dict(layers=[0, "vision.blocks.1"], noise_std=0.2, n_samples=2, progress=False)
    first, again = (llava_cam(model, inp, "red", seed=3, **kwargs) for _ in range(2))
    other = llava_cam(model, inp, "red", seed=4, **kwargs)
    plain = llava_cam(model, inp, "red", **{**kwargs, "noise_std": 0})
    assert torch.equal(first.maps, again.maps)
    assert not torch.equal(first.maps, other.maps) and not torch.equal(first.maps, plain.maps)
    figure = mmlens.plot.llava_cam(first, inp)
    assert figure.data[0].source.startswith("data:image/png")
    heatmap = figure.data[1]  # on the 6 x 12 patches of 7 px
    assert (len(heatmap.z), len(heatmap.z[0]), heatmap.dx) == (6, 12, 7)
    assert "2x2 block of patches" in figure.layout.annotations[-1].text.replace("<br>", " ")


def test_cam_of_the_second_image_of_a_prompt_reads_its_own_rows(model, images):
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    inp = model.prepare([images["square"], images["wide"]], f"Is {image} like {image}?")
    row, index = model.vision_patch_index(inp, 1)
    assert row == 0 and index.min() == 64 and index.max() == 64 + 72 - 1  # after 8 x 8 patches
    alone = model.prepare(images["wide"], "Why?")
    assert torch.equal(model.vision_pixels(inp, 1), model.vision_pixels(alone))
    cam = llava_cam(model, inp, "red", layers=[0, "vision.blocks.0"], noise_std=0, image=1)
    assert cam.maps.shape == (2, 6, 12) and cam.image_pixels.shape == (3, 42, 84)
