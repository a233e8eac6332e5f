"""InstructBLIP (Salesforce/instructblip-vicuna-*) on a random checkpoint of that architecture
(`build_tiny_instructblip`): the inputs against HF's InstructBlipProcessor, parity with HF's model
(logits, every residual, the vision features, the Q-Former's outputs and cross-attention, greedy
generation) in padded batches of mmlens' layout and of HF's, the segments, the errors, and the
runner."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken
from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

import mmlens
from mmlens.inputs import QUERY
from mmlens.testing import (
    assert_matches_hf,
    build_tiny_instructblip,
    hf_answer_gradients,
    hf_position_ids,
    make_test_image,
)

PROMPTS = ["What colour is the door?", "Describe the picture in a few words."]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_instructblip(tmp_path_factory.mktemp("instructblip"))


@pytest.fixture(scope="module")
def hf(folder):
    return InstructBlipForConditionalGeneration.from_pretrained(
        folder, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def hf_processor(folder):
    processor = InstructBlipProcessor.from_pretrained(folder)
    # transformers 5.24 reads `image_token.content` but keeps the tokenizer's string when the
    # tokenizer names its image token (as this one and the hub's do).
    processor.image_token = AddedToken(processor.image_token, special=True, normalized=False)
    return processor


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    return [make_test_image(56, 40, 1), make_test_image(30, 60, 2)]


def test_loads_as_instructblip(model):
    assert type(model).__name__ == "HookedInstructBlip"
    assert model.cfg.vision.kind == "blip" and model.cfg.vision.has_cls
    assert model.cfg.connector.n_query_tokens == 8 and model.default_template == "instructblip"
    hooks = model.hook_dict
    assert (
        "vision.ln_post.hook_normalized" in hooks and "vision.ln_pre.hook_normalized" not in hooks
    )
    assert "qformer.blocks.0.cross_attn.hook_pattern" in hooks  # blocks 0, 2, ... read the image
    assert "qformer.blocks.1.cross_attn.hook_pattern" not in hooks
    assert {"qformer.blocks.1.attn.hook_pattern", "qformer.hook_query_out"} <= set(hooks)


def test_inputs_equal_hf_processors(model, hf_processor, images):
    inp = model.prepare(images[0], PROMPTS[0])
    expected = hf_processor(images=images[0], text=PROMPTS[0], return_tensors="pt")
    assert torch.equal(inp.input_ids, expected["input_ids"])
    assert torch.equal(inp.pixel_values, expected["pixel_values"])
    for name in ("qformer_input_ids", "qformer_attention_mask"):
        assert torch.equal(inp.extra_inputs[name], expected[name])
    assert inp.positions("image").tolist() == list(range(8))
    assert inp.positions("system").numel() == 0
    question = inp.positions("question")
    assert model.to_string(inp.input_ids[0, question]).strip() == PROMPTS[0]
    assert inp.positions("last").tolist() == [inp.input_ids.shape[1] - 1]
    assert (inp.layout.kind == QUERY).all() and inp.layout.col.tolist() == list(range(8))


def test_matches_hf_in_a_padded_batch(hf, model, images):
    inp = model.prepare(images, PROMPTS)
    assert inp.attention_mask[0, :3].tolist() == [0, 0, 0]  # left padding, before the image
    out, cache = assert_matches_hf(hf, model, inp)
    kwargs = inp.model_kwargs()
    with torch.no_grad():
        hf_image = hf.get_image_features(
            kwargs["pixel_values"],
            qformer_input_ids=kwargs["qformer_input_ids"],
            qformer_attention_mask=kwargs["qformer_attention_mask"],
            output_attentions=True,
            return_dict=True,
        )
    vision = hf_image.vision_outputs.last_hidden_state
    assert (cache["vision.hook_features"] - vision).abs().max() < 1e-5
    queries = hf_image.qformer_outputs.last_hidden_state[:, :8]
    assert (cache["qformer.hook_query_out"] - queries).abs().max() < 1e-5
    assert (cache["hook_image_embeds"] - hf_image.pooler_output).abs().max() < 1e-5
    cross = hf_image.qformer_outputs.cross_attentions[0]
    assert cross.shape == (2, 4, 8, 17)  # [image, head, query, CLS + 4 x 4 patches]
    assert (cache["qformer.blocks.0.cross_attn.hook_pattern"] - cross).abs().max() < 1e-6
    with torch.no_grad():
        expected = hf.generate(**kwargs, max_new_tokens=6, do_sample=False)
    generated = model.generate(inp, max_new_tokens=6)[:, inp.input_ids.shape[1] :]
    assert torch.equal(generated, expected[:, -generated.shape[1] :])


def test_hfs_own_padded_batch_gives_hfs_logits(hf, model, hf_processor, images):
    """HF's processor pads between the image block and the text; the keyword path takes it."""
    encoded = hf_processor(images=images, text=PROMPTS, padding=True, return_tensors="pt")
    assert not encoded["attention_mask"][0, 8:].all()  # padding in the middle
    real = encoded["attention_mask"].bool()
    with torch.no_grad():
        expected = hf(**encoded, position_ids=hf_position_ids(encoded["attention_mask"])).logits
        logits = model(**encoded)
    assert (logits - expected)[real].abs().max() < 1e-4


def test_a_padded_item_equals_the_item_alone(model, images):
    batch = model.prepare(images, PROMPTS)
    alone = model.prepare(images[0], PROMPTS[0])
    with torch.no_grad():
        assert (model(batch.item(0)) - model(alone)).abs().max() < 1e-4
        assert (model(batch)[0, -1] - model(alone)[0, -1]).abs().max() < 1e-4


def test_errors(model, images):
    with pytest.raises(
        ValueError, match="learned queries, each a mixture of every patch.*cross_attn.hook_pattern"
    ):
        model.prepare(images[0], PROMPTS[0]).patches_in_box((0, 0, 10, 10))
    with pytest.raises(ValueError, match="one image each"):
        model.prepare(None, PROMPTS[0])
    with pytest.raises(ValueError, match="one image per prompt"):
        model.prepare(images, "Is <image> like <image>?")
    with pytest.raises(ValueError, match="one geometry of its own"):
        model.prepare(images[0], PROMPTS[0], image_mode="pad")
    with pytest.raises(ValueError, match="tokenization='hf'"):
        model.prepare(images[0], PROMPTS[0], tokenization="llava")
    inp = model.prepare(images[0], PROMPTS[0])
    with pytest.raises(ValueError, match="qformer_input_ids"):
        model(input_ids=inp.input_ids, pixel_values=inp.pixel_values)


def test_the_runner_runs_on_it_without_the_box_flows(folder, tmp_path):
    result = mmlens.run(
        "knockout", folder, "shapes:7", tmp_path / "run", window_size=1, progress=False
    )
    assert set(result["flow"]) == {"Image→Last", "Question→Last", "Last→Last", "Image→Question"}


def test_llava_cam_goes_through_the_qformers_cross_attention(hf, model, images):
    """Decoder maps: Grad-CAM relevance of each query, spread over the patches by the mean
    cross-attention; vision maps: Grad-CAM on the patches. Both against autograd through HF."""
    inp = model.prepare(images[0], PROMPTS[0])
    cam = mmlens.analysis.llava_cam(
        model, inp, "red", layers=[0, 1, "vision.blocks.0"], noise_std=0, progress=False
    )
    kwargs = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, "red")).model_kwargs()
    decoder = [hf.language_model.model.layers[layer].post_attention_layernorm for layer in (0, 1)]
    vision = hf.vision_model.encoder.layers[0].layer_norm2
    cross = hf.qformer.encoder.layer[0].crossattention.attention  # blocks 0 of 2 read the image
    patterns = []
    handle = cross.register_forward_hook(lambda m, a, out: patterns.append(out[1]))
    try:
        outputs, gradients = hf_answer_gradients(
            hf, kwargs, [vision, *decoder], inp.input_ids.shape[1]
        )
    finally:
        handle.remove()
    spread = torch.stack(patterns).mean((0, 2))[0, :, 1:].detach()  # [query, patch], CLS dropped
    queries = inp.positions("image")
    expected = []
    for activation, gradient in zip(outputs[1:], gradients[1:], strict=True):
        relevance = (activation[0, queries].detach() @ gradient[0, queries].mean(0)).relu()
        expected.append((relevance @ spread).reshape(4, 4))
    features, gradient = outputs[0][0, 1:], gradients[0][0, 1:]
    expected.append((features.detach() @ gradient.mean(0)).relu().reshape(4, 4))
    expected = torch.stack(expected)
    expected = expected / expected.amax((1, 2), keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)
    scores = mmlens.analysis.box_scores(model, inp, [(0, 0, 28, 20)], cam.maps)
    assert scores["area_share"] == 4 / 16  # the top-left 2 x 2 patches of the 4 x 4 grid
    caption = mmlens.plot.llava_cam(cam, inp).layout.annotations[-1].text
    assert "Q-Former" in caption


def test_the_demo_report_runs_on_it(model, tmp_path):
    from mmlens.report import write_report
    from mmlens.zoo.shapes import generate

    html = write_report(model, generate(4, seed=1), tmp_path / "r.html", progress=False).read_text()
    assert "LLaVA-CAM" in html and "Related patches" not in html
    # A random model: every sample is used.
    assert "No sample was answered correctly: the analyses below use all of them." in html


def test_the_papers_presets_keep_its_own_geometry(model, images):
    for preset in (mmlens.presets.CROSS_MODAL_FLOW, mmlens.presets.REDUNDANCY_TO_RELEVANCE):
        inp = model.prepare(images[0], "Is the door red?", preset=preset)
        assert inp.settings["tokenization"] == "hf" and inp.settings["image_mode"] is None
        preset.check_input(model, inp)


def test_reads_the_hubs_layout_of_processor_files(folder, model, images, tmp_path):
    """Salesforce/instructblip-vicuna-* keep the image settings in preprocessor_config.json and
    only num_query_tokens in processor_config.json (transformers 5 nests them in one file)."""
    import json
    import shutil

    hub = tmp_path / "hub-layout"
    shutil.copytree(folder, hub)
    nested = json.loads((hub / "processor_config.json").read_text())
    image_settings = {**nested.pop("image_processor"), "processor_class": "InstructBlipProcessor"}
    (hub / "preprocessor_config.json").write_text(json.dumps(image_settings))
    (hub / "processor_config.json").write_text(json.dumps(nested))
    from_hub_layout = mmlens.from_pretrained(hub)
    inp = from_hub_layout.prepare(images[0], PROMPTS[0])
    expected = model.prepare(images[0], PROMPTS[0])
    assert torch.equal(inp.pixel_values, expected.pixel_values)
    assert torch.equal(inp.input_ids, expected.input_ids)
    with torch.no_grad():
        assert torch.equal(from_hub_layout(inp), model(expected))
