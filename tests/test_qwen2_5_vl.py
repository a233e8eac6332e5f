"""Qwen2.5-VL on a random checkpoint of that architecture (`build_tiny_qwen2_5_vl`): parity with
HF's model (logits and every residual, one image and a left-padded batch of two images of
different sizes, greedy generation), the tower's windows (they change the output; HF reorders
patches window by window, mmlens masks them in the processor's order), and LLaVA-CAM against
Grad-CAM through HF's model, whose vision states are in window order."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

import mmlens
from mmlens.analysis import llava_cam
from mmlens.models.family import ImageTokenGeometry, VisionLanguageFamily
from mmlens.models.qwen2_5_vl import HookedQwen25VL, window_ids
from mmlens.testing import (
    build_tiny_qwen2_5_vl,
    hf_answer_gradients,
    hf_qwen_vl_inputs,
    make_test_image,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen2.5-vl"))


@pytest.fixture(scope="module")
def hf(folder):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    # 56 x 56: 4 x 4 cells, 2 x 2 windows of 2 x 2 cells; 90 x 40 -> 84 x 42: 3 x 6 cells,
    # windows of 2 x 2 cells and, on the last cell row, of 1 x 2.
    return {"square": make_test_image(56, 56, 1), "wide": make_test_image(90, 40, 2)}


def largest_difference(hf, model, inp) -> float:
    """Logits and every layer's residual stream at real positions against HF's."""
    with torch.no_grad():
        out = hf(**hf_qwen_vl_inputs(model, inp), output_hidden_states=True)
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


def test_loads_as_qwen2_5_vl_and_satisfies_the_contract(model, images):
    assert type(model) is HookedQwen25VL and isinstance(HookedQwen25VL, VisionLanguageFamily)
    assert model.cfg.connector.window_size == 28
    assert model.cfg.connector.fullatt_block_indexes == (1,)
    assert model.default_template == "qwen2_vl"
    inp = model.prepare(images["square"], "What colour is the star?")
    assert isinstance(inp.image_geometry[0], ImageTokenGeometry)
    assert {"vision.blocks.0.mlp.hook_pre_linear", "vision.blocks.2.ln2.hook_scale"} <= set(
        model.hook_dict
    )


def test_windows_group_cells_as_hf(model, images):
    inp = model.prepare([images["square"], images["wide"]], ["Why?", "Why?"])
    grids = inp.extra_inputs["image_grid_thw"]
    ours = window_ids(grids, 2, 2)
    order, bounds = get_vision_window_index(
        grids, spatial_merge_size=2, window_size=28, patch_size=7
    )
    # HF: cells in window order (`order`), `bounds` splitting the reordered patches by window.
    patches = (order[:, None] * 4 + torch.arange(4)).flatten()
    theirs = torch.empty_like(ours)
    for window, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        theirs[patches[start:stop]] = window
    assert torch.equal(ours, theirs) and len(ours.unique()) == 4 + 6


def test_one_image_matches_hf(hf, model, images):
    inp = model.prepare(images["square"], "What colour is the star?")
    assert largest_difference(hf, model, inp) < TOLERANCE


def test_padded_batch_of_two_image_sizes_matches_hf_and_windows_matter(hf, model, images):
    inp = model.prepare(
        [images["wide"], images["square"]], ["What colour is the star in the corner?", "Why?"]
    )
    assert not inp.attention_mask.bool().all()  # left-padded
    assert largest_difference(hf, model, inp) < TOLERANCE
    every_block = dict(vars(model.cfg.connector), fullatt_block_indexes=(0, 1, 2))
    original = model.cfg.connector
    try:
        model.cfg.connector = type(original)(**every_block)
        model.vision.extras = model.cfg.connector
        assert largest_difference(hf, model, inp) > 1e-2  # without windows: not HF's model
    finally:
        model.cfg.connector = model.vision.extras = original


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


def test_llava_cam_equals_grad_cam_through_hf(hf, model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    answer = "red car"
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
    grid = inp.extra_inputs["image_grid_thw"]
    order, _ = get_vision_window_index(grid, spatial_merge_size=2, window_size=28, patch_size=7)
    window_rows = (order[:, None] * 4 + torch.arange(4)).flatten()  # HF row -> processor row
    to_hf = torch.argsort(window_rows)  # processor row -> HF row
    processor_row = torch.tensor(
        [
            [((r // 2) * (cols // 2) + c // 2) * 4 + (r % 2) * 2 + c % 2 for c in range(cols)]
            for r in range(rows)
        ]
    )
    hf_rows = to_hf[processor_row.flatten()]
    vision = outputs[0].reshape(-1, outputs[0].shape[-1])[hf_rows].detach()
    vision_grad = gradients[0].reshape(-1, vision.shape[-1])[hf_rows]
    vision_map = (vision @ vision_grad.mean(0)).relu().reshape(rows, cols)
    image = inp.positions("image")
    tokens, token_grad = outputs[1][0, image].detach(), gradients[1][0, image]
    cells = (tokens @ token_grad.mean(0)).relu().reshape(rows // 2, cols // 2)
    expected = torch.stack([cells.repeat_interleave(2, 0).repeat_interleave(2, 1), vision_map])
    expected = expected / expected.amax((1, 2), keepdim=True)
    assert expected.flatten(1).std(1).min() > 0.05
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)
