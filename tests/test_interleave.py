"""LLaVA-Interleave (llava-interleave-qwen-*-hf): model type ``llava`` with a SigLIP tower and a
Qwen2 decoder, on a random checkpoint of that architecture (`build_tiny_llava_interleave`); and
text-only Qwen2 checkpoints. Parity with Hugging Face (logits, every residual, greedy
generation), SigLIP's hooks and geometry, several images per prompt, and the runner."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

import mmlens
from mmlens.testing import (
    _randomize_weights,
    assert_matches_hf,
    build_tiny_llava_interleave,
    hf_answer_gradients,
    make_test_image,
    make_tokenizer,
)

PROMPTS = ["What is in the picture?", "Describe it."]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def models(request, tmp_path_factory):
    folder = build_tiny_llava_interleave(
        tmp_path_factory.mktemp("interleave"), tie_word_embeddings=request.param
    )
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, mmlens.from_pretrained(folder), folder


@pytest.fixture(scope="module")
def images():
    return [make_test_image(56, 40, 1), make_test_image(40, 72, 2), make_test_image(64, 64, 3)]


def test_loads_a_siglip_tower_and_a_qwen2_decoder(models):
    hf, model, _ = models
    assert model.cfg.vision.kind == "siglip" and not model.cfg.vision.has_cls
    assert model.cfg.decoder_model_type == "qwen2" and model.cfg.qkv_bias
    attention = model.blocks[0].attn
    assert attention.q_proj.bias is not None and attention.o_proj.bias is None
    assert model.default_template == "chatml"
    assert "vision.ln_pre.hook_normalized" not in model.hook_dict
    if model.cfg.tie_word_embeddings:
        assert torch.equal(model.W_U, model.W_E.T)


def test_matches_hf_in_a_padded_batch(models, images):
    hf, model, _ = models
    inp = model.prepare(images[:2], PROMPTS)
    _, cache = assert_matches_hf(hf, model, inp)
    n_patches = model.cfg.vision.grid_size**2  # every SigLIP token is a patch
    assert len(inp.positions("image")) == n_patches
    assert cache["vision.hook_embed"].shape[1] == n_patches
    with torch.no_grad():
        expected = hf.generate(**inp.model_kwargs(), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(inp, max_new_tokens=6), expected)


def test_several_images_in_one_prompt_match_hf(models, images):
    hf, model, _ = models
    inp = model.prepare([images[:2], images[2]], ["Is <image> like <image>?", "What is it?"])
    assert inp.image_items == [0, 0, 1]
    assert_matches_hf(hf, model, inp)


def test_boxes_map_through_siglips_squash(models, images):
    _, model, _ = models
    inp = model.prepare(images[0], PROMPTS[0])  # 56 x 40, squashed to 28 x 28
    grid = inp.layout.patch_grid(0)
    width, height = images[0].size
    left = inp.patches_in_box((0, 0, width // 2, height))
    assert torch.equal(left.sort().values, grid[:, : grid.shape[1] // 2].flatten().sort().values)


def test_the_runner_runs_on_it(models, tmp_path):
    _, _, folder = models
    result = mmlens.run(
        "knockout", folder, "shapes:7", tmp_path / "run", window_size=1, progress=False
    )
    assert set(result.flow) >= {"Image→Last", "Question→Last"} and len(result) > 0


def test_text_only_qwen2_matches_hf(tmp_path):
    tokenizer = make_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=8,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(config).eval()
    _randomize_weights(hf)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = mmlens.from_pretrained(tmp_path)
    assert model.cfg.sliding_window is None  # named in the config, but switched off
    ids = tokenizer(["A long enough sentence to pass any sliding window of eight."]).input_ids
    ids = torch.tensor(ids)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model(ids) - expected).abs().max() < 1e-4


def test_llava_cam_reads_every_siglip_token_as_a_patch(models, images):
    """SigLIP has no class token: the vision-layer map takes every token (a CLIP-style `1:`
    would drop the first patch and fail to reshape), equal to autograd through HF."""
    hf, model, _ = models
    inp = model.prepare(images[0], PROMPTS[0])
    cam = mmlens.analysis.llava_cam(
        model, inp, "red", layers=[0, "vision.blocks.0"], noise_std=0, progress=False
    )
    kwargs = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, "red")).model_kwargs()
    modules = [
        hf.model.vision_tower.encoder.layers[0].layer_norm2,
        hf.model.language_model.layers[0].post_attention_layernorm,
    ]
    outputs, (vision, decoder) = hf_answer_gradients(hf, kwargs, modules, inp.input_ids.shape[1])
    patches = inp.layout.patch_grid(0).flatten()
    expected = [
        (outputs[1][0, patches].detach() @ decoder[0, patches].mean(0)).relu(),
        (outputs[0][0].detach() @ vision[0].mean(0)).relu(),
    ]
    expected = torch.stack(expected).reshape(2, 4, 4)
    expected = expected / expected.amax((1, 2), keepdim=True)
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)


def test_the_demo_report_runs_on_it(models, tmp_path):
    from mmlens.report import write_report
    from mmlens.zoo.shapes import generate

    _, model, _ = models
    html = write_report(model, generate(4, seed=1), tmp_path / "r.html", progress=False).read_text()
    assert "LLaVA-CAM" in html and "Related patches" in html
