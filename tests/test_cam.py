"""LLaVA-CAM against autograd through the Hugging Face model, the one-backward-pass claim, the
options of the authors' script, and the overlay figure."""

from __future__ import annotations

import base64
import io

import plotly.graph_objects as go
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

import mmlens
from mmlens import plot
from mmlens.analysis.cam import llava_cam

ANSWER = "red car"
DECODER_LAYERS = [0, 1, 2, 3]
VISION_LAYERS = ["vision.blocks.0", "vision.blocks.1"]


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return tiny_checkpoint(n_layers=4)


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def inp(model, images):
    return model.prepare(images[1], "What colour is the door?")


@pytest.fixture(scope="module")
def hf_cam(folder, inp, images):
    """Grad-CAM computed independently through HF's model: hooks on the post-attention norms
    (decoder) and CLIP's `layer_norm2`, the answer teacher-forced by HF's processor."""
    hf = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    encoded = AutoProcessor.from_pretrained(folder)(
        images=images[1], text=f"{inp.prompts[0]} {ANSWER}", return_tensors="pt"
    )
    n_prompt = inp.input_ids.shape[1]
    assert torch.equal(encoded.input_ids[:, :n_prompt], inp.input_ids)
    decoder_layers, vision_layers = (
        hf.model.language_model.layers,
        hf.model.vision_tower.encoder.layers,
    )
    modules = [decoder_layers[layer].post_attention_layernorm for layer in DECODER_LAYERS]
    modules += [vision_layers[layer].layer_norm2 for layer in (0, 1)]
    patches = inp.layout.patch_grid(0)

    def maps(pixel_values, relu_gradients=False):
        outputs = []
        handles = [
            module.register_forward_hook(lambda module, args, output: outputs.append(output))
            for module in modules
        ]
        logits = hf(**dict(encoded, pixel_values=pixel_values)).logits
        for handle in handles:
            handle.remove()
        vision, decoder = outputs[:2], outputs[2:]  # the vision tower runs first
        answer = encoded.input_ids[0, n_prompt:]
        target = logits[0, n_prompt - 1 + torch.arange(len(answer)), answer].sum()
        gradients = torch.autograd.grad(target, decoder + vision)
        result = []
        for index, (activation, gradient) in enumerate(
            zip(decoder + vision, gradients, strict=True)
        ):
            # decoder: the image tokens' positions; vision: CLS first, then the patches row-major
            at = patches.flatten() if index < len(decoder) else slice(1, None)
            features, gradient = activation[0, at], gradient[0, at]
            if relu_gradients:
                gradient = gradient.relu()
            result.append((features.detach() @ gradient.mean(0)).relu().reshape(patches.shape))
        return torch.stack(result)

    return maps


def normalise(maps):
    return maps / maps.amax((1, 2), keepdim=True).clamp_min(1e-30)


def test_maps_equal_hf_autograd_for_decoder_and_vision_layers(model, inp, hf_cam):
    cam = llava_cam(model, inp, ANSWER, layers=DECODER_LAYERS + VISION_LAYERS, noise_std=0)
    expected = normalise(hf_cam(inp.pixel_values))
    assert cam.maps.shape == (6, 4, 4)
    assert cam.layers == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", *VISION_LAYERS]
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)
    assert (cam.maps.amax((1, 2))[:3] == 1).all()
    # The last layer's norm output at image positions reaches no later position: map all zero.
    assert (cam.maps[3] == 0).all()


def test_smoothgrad_noise_is_pixel_noise_over_the_processor_std(model, inp, hf_cam):
    cam = llava_cam(model, inp, ANSWER, layers=DECODER_LAYERS + VISION_LAYERS, noise_std=0.3,
                    n_samples=1, seed=7)  # fmt: skip
    noise = torch.randn(inp.pixel_values.shape, generator=torch.Generator().manual_seed(7))
    std = torch.tensor(model.processor.image_processor.image_std)[:, None, None]
    expected = normalise(hf_cam(inp.pixel_values + 0.3 * noise / std))
    torch.testing.assert_close(cam.maps, expected, atol=5e-5, rtol=0)
    noiseless = llava_cam(model, inp, ANSWER, layers=[0], noise_std=0)
    assert not torch.allclose(cam.maps[0], noiseless.maps[0], atol=1e-3)


def test_all_layers_come_from_one_backward_pass_per_sample(model, inp, monkeypatch):
    layers = [0, 2, "vision.blocks.1"]
    calls = []
    grad = torch.autograd.grad

    def counting_grad(outputs, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    together = llava_cam(model, inp, ANSWER, layers=layers, noise_std=0.2, n_samples=3, seed=1)
    assert calls == [3, 3, 3]
    assert together.settings["n_samples"] == 3
    one_by_one = [
        llava_cam(model, inp, ANSWER, layers=[layer], noise_std=0.2, n_samples=3, seed=1).maps[0]
        for layer in layers
    ]
    torch.testing.assert_close(together.maps, torch.stack(one_by_one), atol=1e-6, rtol=1e-5)


def test_options_of_the_authors_script(model, inp, hf_cam):
    relu = llava_cam(model, inp, ANSWER, layers=DECODER_LAYERS + VISION_LAYERS, noise_std=0,
                     relu_gradients=True)  # fmt: skip
    expected = normalise(hf_cam(inp.pixel_values, relu_gradients=True))
    torch.testing.assert_close(relu.maps, expected, atol=5e-5, rtol=0)

    plain = llava_cam(model, inp, ANSWER, layers=[0, 1], noise_std=0)
    cut = llava_cam(model, inp, ANSWER, layers=[0, 1], noise_std=0, threshold=0.5)
    torch.testing.assert_close(cut.maps, torch.where(plain.maps >= 0.5, plain.maps, 0.0))
    assert ((cut.maps == 0) | (cut.maps >= 0.5)).all() and (cut.maps == 0).any()


def test_answer_as_token_ids(model, inp):
    by_text = llava_cam(model, inp, ANSWER, layers=[1], noise_std=0)
    by_ids = llava_cam(model, inp, by_text.settings["answer_ids"], layers=[1], noise_std=0)
    torch.testing.assert_close(by_text.maps, by_ids.maps)


def test_errors(model, inp, images):
    with pytest.raises(ValueError, match="vision.blocks.2.* did not run.*vision_feature_layer=-2"):
        llava_cam(model, inp, ANSWER, layers=["vision.blocks.2"], noise_std=0)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        llava_cam(model, inp, ANSWER, layers=[9], noise_std=0)
    with pytest.raises(ValueError, match="site"):
        llava_cam(model, inp, ANSWER, site="attn", noise_std=0)
    with pytest.raises(ValueError, match="vision layers as"):
        llava_cam(model, inp, ANSWER, layers=["blocks.1"], noise_std=0)
    batch = model.prepare([images[0], images[1]], ["Hi?", "What colour is the door?"])
    with pytest.raises(ValueError, match="single prompt"):
        llava_cam(model, batch, ANSWER, noise_std=0)


def test_overlay_figure_shows_the_image_as_the_model_saw_it(model, inp, images):
    cam = llava_cam(model, inp, ANSWER, layers=[0, 1, 2, 3, "vision.blocks.0"], noise_std=0)
    figure = plot.llava_cam(cam, inp)
    assert isinstance(figure, go.Figure)
    assert len(figure.data) == 2 * len(cam.layers)  # per panel: the image and the map
    assert [trace.type for trace in figure.data[:2]] == ["image", "heatmap"]
    titles = [annotation.text for annotation in figure.layout.annotations]
    assert titles[: len(cam.layers)] == cam.layers and "padded to 88x88" in titles[-1]
    assert "(the checkpoint's processor)" in titles[-1]  # the caption names the image mode
    squashed = model.prepare(images[1], "What colour is the door?", image_mode="squash")
    caption = plot.llava_cam(cam, squashed).layout.annotations[-1].text
    assert "resized to 56x56" in caption and "image_mode='squash'" in caption

    # The wide 88x48 test image is padded to 88x88 (20 rows on top) and resized to 56x56.
    box = figure.layout.shapes[0]
    assert box.x0 == -0.5 and box.x1 == 55.5
    assert box.y0 == pytest.approx(20 * 56 / 88 - 0.5) and box.y1 == pytest.approx(
        68 * 56 / 88 - 0.5
    )
    png = base64.b64decode(figure.data[0].source.split(",", 1)[1])
    pixels = torch.tensor(list(Image.open(io.BytesIO(png)).convert("RGB").getdata()))
    pad_colour = torch.tensor([round(255 * m) for m in model.processor.image_processor.image_mean])
    assert (pixels[0] - pad_colour).abs().max() <= 2  # the padding is the mean colour


# --- LLaVA-NeXT ----------------------------------------------------------------------------------


def next_cam_by_hand(folder, inp, layers, answer):
    """Grad-CAM through HF's LlavaNextForConditionalGeneration, on the base grid and on the
    unpadded tile grid. Decoder maps read the positions `inp.layout` gives; vision maps take each
    high-resolution cell from its tile crop, found from the layout's tile index and the cell's
    place on the tile canvas (kept rows and columns offset), not by reshaping."""
    from transformers import LlavaNextForConditionalGeneration

    hf = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    ids = inp.with_tokens(mmlens.analysis.answer_token_ids(mmlens.from_pretrained(folder), inp,
                                                           answer)).model_kwargs()  # fmt: skip
    n_prompt = inp.input_ids.shape[1]
    decoder = [hf.model.language_model.layers[layer].post_attention_layernorm for layer in layers]
    vision = hf.model.vision_tower.encoder.layers[0].layer_norm2
    outputs = []
    handles = [
        m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in [vision] + decoder
    ]
    logits = hf(**ids).logits
    for handle in handles:
        handle.remove()
    answer_ids = ids["input_ids"][0, n_prompt:]
    target = logits[0, n_prompt - 1 + torch.arange(len(answer_ids)), answer_ids].sum()
    gradients = torch.autograd.grad(target, outputs)
    layout, grid = inp.layout, inp.image_geometry[0].grid
    base, high = layout.patch_grid(0), layout.highres_grid(0)
    side = grid.patches_per_tile
    cells = torch.isin(layout.position, high.flatten())
    order = torch.argsort(layout.position[cells])  # the high grid's positions are row-major
    tiles, rows, cols = (t[cells][order] for t in (layout.tile, layout.row, layout.col))
    canvas_rows, canvas_cols = rows + grid.kept_rows.start, cols + grid.kept_cols.start
    within = 1 + (canvas_rows % side) * side + canvas_cols % side
    maps = {"base": [], "high": []}
    for index, (activation, gradient) in enumerate(zip(outputs, gradients, strict=True)):
        if index == 0:  # vision: crop 0 is the base image, crop t the t-th tile, CLS first
            views = {"base": (activation[0, 1:], gradient[0, 1:]),
                     "high": (activation[tiles, within], gradient[tiles, within])}  # fmt: skip
        else:
            views = {name: (activation[0, g.flatten()], gradient[0, g.flatten()])
                     for name, g in (("base", base), ("high", high))}  # fmt: skip
        for name, (features, grads) in views.items():
            shape = (base if name == "base" else high).shape
            maps[name].append((features.detach() @ grads.mean(0)).relu().reshape(shape))
    order = list(range(1, len(outputs))) + [0]  # the decoder layers first, as requested below
    return {
        name: normalise(torch.stack([values[i] for i in order])) for name, values in maps.items()
    }


def test_llava_next_maps_on_the_base_and_tile_grids_equal_hf_autograd(tiny_next_checkpoint):
    folder = tiny_next_checkpoint()
    model = mmlens.from_pretrained(folder)
    inp = model.prepare(Image.new("RGB", (88, 48), "red").point(lambda v: v // 2), "What is it?")
    assert inp.image_geometry[0].grid.tiles == (2, 2)  # tiles and unpadding both at work
    cam = llava_cam(model, inp, ANSWER, layers=[0, 1, "vision.blocks.0"], noise_std=0)
    expected = next_cam_by_hand(folder, inp, [0, 1], ANSWER)
    torch.testing.assert_close(cam.maps, expected["base"], atol=5e-5, rtol=0)
    torch.testing.assert_close(cam.highres_maps, expected["high"], atol=5e-5, rtol=0)
    assert cam.highres_maps.shape[1:] == inp.layout.highres_grid(0).shape
    # Both grids cover the whole image: stretched to its original size (height, width).
    assert cam.on_image().shape == (3, 48, 88) and cam.on_image(highres=False).shape == (3, 48, 88)
    figure = plot.llava_cam(cam, inp)
    assert [trace.type for trace in figure.data[:2]] == ["image", "heatmap"]
    assert "original 88x48" in figure.layout.annotations[-1].text


def test_on_image_is_for_maps_that_cover_the_whole_image(model, inp):
    cam = llava_cam(model, inp, ANSWER, layers=[0], noise_std=0)
    assert cam.highres_maps is None
    with pytest.raises(ValueError, match="covers the processed image"):
        cam.on_image()
