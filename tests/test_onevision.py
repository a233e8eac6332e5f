"""LLaVA-OneVision (llava-onevision-qwen2-*-ov-hf) on a random checkpoint of that architecture
(`build_tiny_llava_onevision`): the image-token count against the arithmetic of HF's
`LlavaOnevisionProcessor`, parity with HF's model (logits, every residual, greedy generation) with
tile grids downsampled and not, several images per prompt, the layout and boxes on a downsampled
grid against PyTorch's own interpolation, LLaVA-CAM against autograd through HF, and the runner."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)

import mmlens
from mmlens.analysis.cam import llava_cam
from mmlens.inputs import NEWLINE, PATCH
from mmlens.models.llava_next.geometry import AnyresGrid, bilinear_sources
from mmlens.testing import (
    assert_matches_hf,
    build_tiny_llava_onevision,
    hf_answer_gradients,
    make_test_image,
)

ANSWER = "red car"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def hf(folder):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    # 56 x 56 and 90 x 40: tile grids of 8 x 8 and 6 x 12 patches, above anyres_max_2's 32
    # patches (downsampled); 20 x 30: 6 x 4 patches (kept as they are).
    return {
        "square": make_test_image(56, 56, 1),
        "wide": make_test_image(90, 40, 2),
        "small": make_test_image(20, 30, 3),
    }


def hf_token_count(image_processor, num_image_tokens, vision_aspect_ratio, height, width):
    """The image-token count of HF's LlavaOnevisionProcessor for one image alone in its prompt,
    from its own methods (the processor itself cannot be built without torchvision)."""
    settings = SimpleNamespace(
        image_processor=image_processor,
        num_image_tokens=num_image_tokens,
        vision_aspect_ratio=vision_aspect_ratio,
    )
    settings._get_unpadded_features = lambda *args: LlavaOnevisionProcessor._get_unpadded_features(
        settings, *args
    )
    side = image_processor.size["height"]
    return LlavaOnevisionProcessor._get_number_of_features(settings, height, width, side, side)


def test_loads_as_onevision(model):
    assert type(model).__name__ == "HookedLlavaOnevision"
    assert model.cfg.vision.kind == "siglip" and not model.cfg.vision.has_cls
    assert (
        model.cfg.decoder_model_type == "qwen2" and model.cfg.vision_aspect_ratio == "anyres_max_2"
    )
    assert model.max_tile_patches == 2 and model.default_template == "qwen_1_5"
    assert type(model.processor).__name__ == "OnevisionProcessor"


def test_token_counts_equal_hf_processors_arithmetic(model):
    """The released settings (384 px tiles of 27 x 27 SigLIP patches, grids up to 6 x 6,
    anyres_max_9) over many image sizes, and the tiny checkpoint's."""
    released = LlavaOnevisionImageProcessorPil()
    rng = random.Random(0)
    sizes = [(rng.randint(8, 4000), rng.randint(8, 4000)) for _ in range(300)]
    sizes += [(1080, 1920), (480, 640), (384, 384), (2304, 2304), (10, 3000), (3000, 10)]
    downsampled = 0
    for height, width in sizes:
        grid = AnyresGrid.for_image(
            (height, width), released.image_grid_pinpoints, 384, 14, max_tile_patches=9
        )
        expected = hf_token_count(released, 729, "anyres_max_9", height, width)
        assert 27 * 27 + grid.n_tokens == expected, (height, width)
        downsampled += grid.downsampled
    assert 30 < downsampled < len(sizes)  # both cases are covered
    tiny = model.processor
    for height, width in sizes[:100]:
        geometry = tiny.image_geometry((height, width), tiled=True)
        expected = hf_token_count(tiny.image_processor, 16, "anyres_max_2", height, width)
        assert geometry.n_image_tokens(has_cls=False) == expected, (height, width)


def test_bilinear_sources_are_the_taps_pytorch_uses():
    for source, target in [(10, 5), (9, 3), (8, 5), (12, 7), (5, 4), (27, 21), (4, 3)]:
        for index in range(source):
            one_hot = torch.zeros(1, 1, 1, source, dtype=torch.float64)
            one_hot[..., index] = 1
            resized = F.interpolate(one_hot, [1, target], mode="bilinear")[0, 0, 0]
            reading = {cell for cell in range(target) if resized[cell] > 1e-12}
            assert reading == {
                cell for cell in range(target) if index in bilinear_sources(cell, source, target)
            }, (source, target, index)


def test_matches_hf_in_a_padded_batch(hf, model, images):
    inp = model.prepare(
        [images["square"], images["small"], None, images["wide"]],
        ["What is it?", "Describe it.", "Hi", "Is the door red?"],
    )
    grids = [geometry.grid for geometry in inp.image_geometry]
    assert [grid.downsampled for grid in grids] == [True, False, True]
    assert [grid.token_grid_size for grid in grids] == [(5, 5), (6, 4), (4, 8)]
    assert [len(inp.positions("image", item=item)) for item in range(4)] == [46, 46, 0, 52]
    _, cache = assert_matches_hf(hf, model, inp)
    assert cache["hook_image_embeds"].shape[1] == 46 + 46 + 52
    with torch.no_grad():
        expected = hf.generate(**inp.model_kwargs(), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(inp, max_new_tokens=6), expected)


def test_images_among_several_are_not_tiled_and_match_hf(hf, model, images):
    inp = model.prepare(
        [[images["square"], images["wide"]], images["small"]],
        ["Is <image> wider than <image>?", "What is it?"],
    )
    assert inp.model_kwargs()["batch_num_images"].tolist() == [2, 1]
    first, second, alone = inp.image_geometry
    assert not hasattr(first, "grid") and first.newline and first.pad_offset == (0, 0)
    assert second.padded_size == (90, 90) and second.pad_offset == (25, 0)
    kinds = inp.layout.kind[inp.layout.image == 1]
    assert kinds.tolist() == [PATCH] * 16 + [NEWLINE]
    assert alone.grid.tiles == (2, 1)
    assert_matches_hf(hf, model, inp)


def test_layout_and_boxes_on_a_downsampled_grid(model, images):
    inp = model.prepare(images["wide"], "What is it?")  # 6 x 12 patches, shrunk to 4 x 8
    geometry = inp.image_geometry[0]
    grid = geometry.grid
    layout = inp.layout
    assert inp.layout.highres_grid(0).shape == (4, 8)
    assert int((layout.kind == NEWLINE).sum()) == 4
    # A cell's tile is the one under its centre: columns 0-3 of 8 lie over canvas tiles 1 and 2.
    cells = layout.kind == PATCH
    tiles = layout.tile[cells & (layout.tile >= 1)].reshape(4, 8)
    assert tiles[0].tolist() == [1, 1, 1, 2, 2, 3, 3, 3] and tiles[3].tolist() == [
        4,
        4,
        4,
        5,
        5,
        6,
        6,
        6,
    ]
    # Oracle: the unpadded patches a box hits (the same geometry without downsampling), pushed
    # through PyTorch's bilinear resize as an indicator; every cell that receives weight is hit.
    unshrunk = AnyresGrid.for_image((40, 90), model.cfg.image_grid_pinpoints, 28, 7)
    assert unshrunk.unpadded_size == (6, 12) and not unshrunk.downsampled
    for box in [(0, 0, 10, 10), (30, 5, 60, 35), (80, 30, 90, 40), (44, 0, 46, 40)]:
        rows, cols = geometry.canvas.patch_ranges(box)
        canvas = [tiles * grid.patches_per_tile for tiles in grid.tiles]
        indicator = torch.zeros(1, 1, *canvas, dtype=torch.float64)
        indicator[0, 0, rows.start : rows.stop, cols.start : cols.stop] = 1
        kept = indicator[
            ...,
            grid.kept_rows.start : grid.kept_rows.stop,
            grid.kept_cols.start : grid.kept_cols.stop,
        ]
        hit = F.interpolate(kept, [4, 8], mode="bilinear")[0, 0] > 1e-12
        expected = set(inp.layout.highres_grid(0)[hit].tolist())
        base_rows, base_cols = geometry.base.patch_ranges(box)
        expected |= set(inp.layout.patch_grid(0)[base_rows, :][:, base_cols].flatten().tolist())
        assert set(inp.patches_in_box(box).tolist()) == expected, box


def test_llava_cam_equals_autograd_through_hf(hf, model, images):
    inp = model.prepare(images["square"], "What is it?")
    grid = inp.image_geometry[0].grid
    assert grid.tiles == (2, 2) and grid.downsampled
    cam = llava_cam(model, inp, ANSWER, layers=[0, 1, "vision.blocks.0"], noise_std=0)
    expected = cam_by_hand(hf, model, inp)
    torch.testing.assert_close(cam.maps, expected["base"], atol=5e-5, rtol=0)
    torch.testing.assert_close(cam.highres_maps, expected["high"], atol=5e-5, rtol=0)
    assert cam.highres_maps.shape[1:] == grid.token_grid_size == (5, 5)
    caption = mmlens.plot.llava_cam(cam, inp).layout.annotations[-1].text
    assert "tile grid (8x8 patches) downsampled (5x5 cells)" in caption


def cam_by_hand(hf, model, inp):
    """Grad-CAM through HF's model: decoder maps at the layout's positions; vision maps from
    each unpadded cell's tile crop (tile and place found by index arithmetic, no class token),
    features and gradients then resized bilinearly to the token grid."""
    ids = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, ANSWER)).model_kwargs()
    modules = [hf.model.vision_tower.encoder.layers[0].layer_norm2]
    modules += [hf.model.language_model.layers[layer].post_attention_layernorm for layer in (0, 1)]
    outputs, gradients = hf_answer_gradients(hf, ids, modules, inp.input_ids.shape[1])
    grid = inp.image_geometry[0].grid
    base, high = inp.layout.patch_grid(0), inp.layout.highres_grid(0)
    side, (_, tiles_wide) = grid.patches_per_tile, grid.tiles
    rows = torch.arange(grid.kept_rows.start, grid.kept_rows.stop)[:, None]
    cols = torch.arange(grid.kept_cols.start, grid.kept_cols.stop)[None, :]
    tile = 1 + (rows // side) * tiles_wide + cols // side
    within = (rows % side) * side + cols % side

    def shrink(values):  # [rows, cols, d] -> the token grid, as the model resamples
        resized = F.interpolate(values.permute(2, 0, 1)[None], list(high.shape), mode="bilinear")
        return resized[0].permute(1, 2, 0).reshape(-1, values.shape[-1])

    maps = {"base": [], "high": []}
    for index, (activation, gradient) in enumerate(zip(outputs, gradients, strict=True)):
        if index == 0:
            views = {
                "base": (activation[0], gradient[0]),
                "high": (shrink(activation[tile, within]), shrink(gradient[tile, within])),
            }
        else:
            views = {
                name: (activation[0, g.flatten()], gradient[0, g.flatten()])
                for name, g in (("base", base), ("high", high))
            }
        for name, (features, grads) in views.items():
            shape = (base if name == "base" else high).shape
            maps[name].append((features.detach() @ grads.mean(0)).relu().reshape(shape))
    order = [1, 2, 0]  # decoder layers first, as requested
    return {
        name: torch.stack([values[i] for i in order])
        / torch.stack([values[i] for i in order]).amax((1, 2), keepdim=True).clamp_min(1e-30)
        for name, values in maps.items()
    }


def test_cam_of_an_image_among_several_has_the_base_map_only(model, images):
    inp = model.prepare([images["square"], images["small"]], "Is <image> like <image>?")
    cam = llava_cam(model, inp, ANSWER, layers=[0, "vision.blocks.0"], noise_std=0, image=1)
    assert cam.maps.shape == (2, 4, 4) and cam.highres_maps is None
    figure = mmlens.plot.llava_cam(cam, inp)  # over its padded crop, as LLaVA-1.5's
    lines = figure.layout.annotations[-1].text.split("<br>")
    assert "padded to 30x30" in " ".join(lines)
    # Wrapped to the narrow two-panel figure (~6.5 px a character), not cut off at its edge.
    assert len(lines) > 2 and max(map(len, lines)) * 6.5 <= figure.layout.width - 60


def test_errors(model, images):
    with pytest.raises(ValueError, match="one geometry of its own"):
        model.prepare(images["square"], "Why?", anyres="llava")
    with pytest.raises(ValueError, match="one geometry of its own"):
        model.prepare(images["square"], "Why?", image_mode="pad")
    with pytest.raises(ValueError, match="tiled by its own rule"):
        model.tile_grid((40, 90), anyres="llava")
    with pytest.raises(ValueError, match="1 image\\(s\\) for 2 '<image>' placeholder"):
        model.processor(images=[images["square"]], text=["<image> and <image>"])
    with pytest.raises(ValueError, match="anyres_max_N"):
        mmlens.models.llava_onevision.processor.max_tile_patches("anyres")


def test_the_runner_runs_on_it(folder, tmp_path):
    result = mmlens.run(
        "knockout", folder, "shapes:7", tmp_path / "run", window_size=1, progress=False
    )
    assert set(result.flow) >= {"Image→Last", "Question→Last"} and len(result) > 0


def test_the_demo_report_runs_on_it(model, tmp_path):
    from mmlens.report import write_report
    from mmlens.zoo.shapes import generate

    path = write_report(model, generate(4, seed=1), tmp_path / "report.html", progress=False)
    html = path.read_text()
    assert "LLaVA-CAM" in html and "knockout" in html.lower() and len(html) > 100_000


def test_the_papers_presets_keep_its_own_geometry(model, images):
    for preset in (mmlens.presets.CROSS_MODAL_FLOW, mmlens.presets.REDUNDANCY_TO_RELEVANCE):
        inp = model.prepare(images["square"], "Is the door red?", preset=preset)
        assert inp.settings["tokenization"] == "hf" and inp.settings["image_mode"] is None
        preset.check_input(model, inp)
