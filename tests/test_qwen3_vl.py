"""Qwen3-VL on a random checkpoint of that architecture (`build_tiny_qwen3_vl`): parity with
HF's model (logits and the residual stream entering every decoder layer, one image and a
left-padded batch of two images of different sizes, greedy generation), and that what is new
against Qwen2-VL matters: DeepStack, interleaved M-RoPE, the learned position grid, the Qwen3
query/key norms. Pruning, the knockout engine and the KV cache carry DeepStack's vectors; LLaVA-CAM against Grad-CAM through HF's model."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3VLForConditionalGeneration

import mmlens
from mmlens.ablations import attention_knockout, drop_tokens
from mmlens.analysis import knockout_sweep, llava_cam
from mmlens.inputs.templates import render
from mmlens.models.family import VisionLanguageFamily
from mmlens.models.qwen3_vl import HookedQwen3VL
from mmlens.testing import (
    build_tiny_qwen3_vl,
    hf_answer_gradients,
    hf_qwen_vl_inputs,
    make_test_image,
)

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen3_vl(tmp_path_factory.mktemp("qwen3-vl"))


@pytest.fixture(scope="module")
def hf(folder):
    return Qwen3VLForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    # 64 x 64: 4 x 4 cells of 16 px (8 x 8 patches, the 6 x 6 position grid stretched);
    # 100 x 40 -> 96 x 48: 3 x 6 cells.
    return {"square": make_test_image(64, 64, 1), "wide": make_test_image(100, 40, 2)}


def largest_difference(hf, model, inp) -> float:
    """Logits, the residual stream entering every decoder layer (HF's `hidden_states` are the
    layers' outputs before DeepStack adds to them, so its layers' inputs are read) and the
    final norm's output, at real positions, against HF's."""
    entering = {}

    def keep(layer):
        def hook(module, args, kwargs):
            entering[layer] = args[0] if args else kwargs["hidden_states"]

        return hook

    layers = hf.model.language_model.layers
    handles = [
        block.register_forward_pre_hook(keep(i), with_kwargs=True) for i, block in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            out = hf(**hf_qwen_vl_inputs(model, inp), output_hidden_states=True)
            logits, cache = model.run_with_cache(inp)
    finally:
        for handle in handles:
            handle.remove()
    real = inp.attention_mask.bool()
    differences = [(out.logits - logits)[real].abs().max()]
    for layer in range(model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        differences.append((entering[layer] - resid)[real].abs().max())
    final = cache["ln_final.hook_normalized"]
    differences.append((out.hidden_states[-1] - final)[real].abs().max())
    assert logits.std() > 0.5, "random checkpoint too flat for parity to mean anything"
    return float(max(differences))


def test_loads_as_qwen3_vl_and_satisfies_the_contract(model, images):
    assert type(model) is HookedQwen3VL and isinstance(HookedQwen3VL, VisionLanguageFamily)
    assert model.cfg.connector.deepstack_layers == (0, 1) and model.cfg.qk_norm
    assert model.default_template == "qwen3_vl"
    inp = model.prepare(images["square"], "What colour is the star?")
    assert inp.image_geometry[0].grid_size == (4, 4) and len(inp.positions("image")) == 16
    prompt = model.to_string(inp.input_ids[0])  # no system turn by default
    assert "system" not in prompt and "<|im_start|>user\n<|vision_start|>" in prompt
    names = set(model.hook_dict)
    assert {"blocks.0.hook_deepstack", "blocks.1.hook_deepstack"} <= names
    assert "blocks.2.hook_deepstack" not in names
    assert {"blocks.0.attn.q_norm.hook_normalized", "vision.deepstack_mergers.1.hook_merged"} <= (
        names
    )


def test_the_template_is_the_released_chat_templates_prompt():
    # Qwen3-VL's chat template writes no system turn unless given one (Qwen2-VL's does).
    rendered = render("qwen3_vl", "What colour is the door?", n_images=1, image_token="<I>")
    assert rendered.text == (
        "<|im_start|>user\n<|vision_start|><I><|vision_end|>What colour is the door?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = render("qwen3_vl", "Why?", n_images=0, system="Be brief.")
    assert with_system.text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")


def test_one_image_matches_hf(hf, model, images):
    inp = model.prepare(images["square"], "What colour is the star?")
    assert largest_difference(hf, model, inp) < TOLERANCE


def test_padded_batch_of_two_image_sizes_matches_hf(hf, model, images):
    inp = model.prepare(
        [images["wide"], images["square"]], ["What colour is the star in the corner?", "Why?"]
    )
    assert not inp.attention_mask.bool().all()  # left-padded
    assert largest_difference(hf, model, inp) < TOLERANCE


def test_deepstack_enters_after_its_block_at_the_image_tokens(hf, model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    _, cache = model.run_with_cache(inp)
    image = inp.positions("image")
    for layer in (0, 1):
        added = cache[f"blocks.{layer}.hook_deepstack"]
        assert added[0, image].abs().amax(-1).min() > 0  # every image token gets a vector
        others = torch.ones(added.shape[1], dtype=torch.bool)
        others[image] = False
        assert added[0, others].abs().max() == 0
        torch.testing.assert_close(
            cache[f"blocks.{layer + 1}.hook_resid_pre"],
            cache[f"blocks.{layer}.hook_resid_post"] + added,
        )
    # Without it, not HF's model.
    with model.hooks(fwd_hooks=[("blocks.0.hook_deepstack", lambda x, hook: x * 0)]):
        assert largest_difference(hf, model, inp) > 1e-2


def test_interleaved_rotary_and_learned_positions_matter(hf, model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    rotary = model.rotary
    try:
        model.rotary = type(rotary)(
            model.cfg.d_head, model.cfg.rope_parameters, sections=rotary.sections
        )
        assert largest_difference(hf, model, inp) > 1e-3  # consecutive sections: not HF's
    finally:
        model.rotary = rotary
    with model.hooks(
        fwd_hooks=[("vision.hook_embed", lambda x, hook: x - x.mean(1, keepdim=True))]
    ):
        assert largest_difference(hf, model, inp) > 1e-3


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


def test_dropping_the_image_equals_knocking_it_out_with_deepstack(model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    image = inp.positions("image")
    after = torch.arange(int(image[-1]) + 1, inp.input_ids.shape[1])
    layer = 1  # DeepStack adds to the image rows after block 1 too: they are gone by then
    dropped = model.run_with_hooks(inp, fwd_hooks=drop_tokens(image, from_layer=layer))
    knocked = model.run_with_hooks(
        inp, fwd_hooks=attention_knockout(image, after, range(layer, model.cfg.n_layers))
    )
    assert dropped.shape[1] == inp.input_ids.shape[1] - len(image)
    torch.testing.assert_close(dropped[:, -1], knocked[:, -1], atol=1e-5, rtol=0)


def test_the_knockout_sweep_engine_equals_full_runs(model, images):
    inp = model.prepare([images["square"], images["wide"]], ["What colour is the star?", "Why?"])
    kwargs = dict(window_size=1, progress=False)
    engine = knockout_sweep(model, inp, method="engine", **kwargs)
    naive = knockout_sweep(model, inp, method="naive", **kwargs)
    assert {"Image→Last", "Image→Question"} <= set(engine["flow"])
    assert (engine["p_new"] - naive["p_new"]).abs().max() < 1e-5


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
    _, rows, cols = inp.extra_inputs["image_grid_thw"][0].tolist()
    # HF's rows (the processor's): each 2 x 2 cell's patches together, cells row-major.
    order = torch.tensor(
        [
            [((r // 2) * (cols // 2) + c // 2) * 4 + (r % 2) * 2 + c % 2 for c in range(cols)]
            for r in range(rows)
        ]
    ).flatten()
    vision = outputs[0].reshape(-1, outputs[0].shape[-1])[order].detach()
    vision_grad = gradients[0].reshape(-1, vision.shape[-1])[order]
    vision_map = (vision @ vision_grad.mean(0)).relu().reshape(rows, cols)
    image = inp.positions("image")
    tokens, token_grad = outputs[1][0, image].detach(), gradients[1][0, image]
    cells = (tokens @ token_grad.mean(0)).relu().reshape(rows // 2, cols // 2)
    expected = torch.stack([cells.repeat_interleave(2, 0).repeat_interleave(2, 1), vision_map])
    expected = expected / expected.amax((1, 2), keepdim=True)
    assert expected.flatten(1).std(1).min() > 0.05  # maps with structure, not flat
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)


def test_an_item_of_a_batch_with_a_text_only_one_equals_it_alone(model, images):
    inp = model.prepare([images["square"], None, images["wide"]], ["Why?", "Hi", "Is it red?"])
    full = model(inp)
    for index in range(3):  # DeepStack's vectors land on each item's own image tokens
        alone = model(inp.item(index))
        torch.testing.assert_close(alone[0, -1], full[index, -1], atol=1e-4, rtol=0)
    assert model("Is the star red?").shape[:2] == (1, 6)  # text alone: no DeepStack


def test_generation_with_the_image_dropped_equals_a_full_pass_with_it_dropped(model, images):
    # The cached steps (no DeepStack for new tokens, a pruned KV cache) against one
    # teacher-forced pass over prompt and answer.
    inp = model.prepare(images["wide"], "What colour is the star?")
    n, new = inp.input_ids.shape[1], 4
    hooks = drop_tokens(inp.positions("image"), from_layer=1)
    with model.hooks(fwd_hooks=hooks):
        generated = model.generate(inp, max_new_tokens=new, stop_at_eos=False)
        forced = model(inp.with_tokens(generated[:, n:]))
    assert torch.equal(forced[:, -new - 1 : -1].argmax(-1), generated[:, n:])
