"""InternVL (transformers' ``internvl``) on a random checkpoint of that architecture
(`build_tiny_internvl`: 56 px crops of 7 px patches, 4 x 4 tokens per crop after the pixel
shuffle): the inputs against HF's image processor, the expansion rule of `InternVLProcessor` and
the checkpoint's chat template; parity with HF's model (logits and every residual within 1e-4,
a left-padded batch of two images with different tile counts; greedy generation); the layout
of tiles and thumbnail and boxes on both; pruning against knockout; the sweep engine; LLaVA-CAM
against Grad-CAM through HF's modules; the runner, the report and the presets."""

from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoTokenizer,
    GotOcr2ImageProcessorPil,
    InternVLForConditionalGeneration,
)
from transformers.image_utils import PILImageResampling

import mmlens
from mmlens.ablations import attention_knockout, drop_tokens
from mmlens.analysis import knockout_sweep, llava_cam
from mmlens.analysis.grounding import last_row_attention_maps
from mmlens.models.family import ImageTokenGeometry, TileGrid, VisionLanguageFamily
from mmlens.models.internvl import HookedInternVL
from mmlens.models.internvl.vision import pixel_shuffle
from mmlens.presets import CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE
from mmlens.testing import (
    build_tiny_internvl,
    hf_answer_gradients,
    hf_position_ids,
    make_test_image,
)

TOLERANCE = 1e-4
SIDE = 4  # tokens per crop side: 56 px / 7 px patches / 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_internvl(tmp_path_factory.mktemp("internvl"))


@pytest.fixture(scope="module")
def hf(folder):
    return InternVLForConditionalGeneration.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    # 90 x 40: 2 x 1 tiles + thumbnail; 100 x 100: 2 x 2 tiles + thumbnail; 56 x 56: one crop.
    return {
        "wide": make_test_image(90, 40, 2),
        "square": make_test_image(100, 100, 1),
        "small": make_test_image(56, 56, 3),
    }


def assert_matches_hf(hf, model, inp) -> float:
    """Logits and every layer's residual stream at real positions within TOLERANCE of HF's;
    returns the largest difference."""
    with torch.no_grad():
        out = hf(
            **inp.model_kwargs(),
            position_ids=hf_position_ids(inp.attention_mask),
            output_hidden_states=True,
        )
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


def test_loads_as_internvl_and_satisfies_the_contract(model, images):
    assert type(model) is HookedInternVL and isinstance(HookedInternVL, VisionLanguageFamily)
    assert model.token_patch_size == 14 and model.default_template == "internvl"
    assert model.cfg.vision.has_ln_post and model.cfg.connector.qk_norm
    inp = model.prepare(images["square"], "What colour is the star?")
    geometry = inp.image_geometry[0]
    assert isinstance(geometry, ImageTokenGeometry) and isinstance(geometry.tile_grid, TileGrid)
    assert {
        "vision.hook_embed",
        "vision.blocks.1.attn.hook_pattern",
        "vision.blocks.0.attn.q_norm.hook_normalized",
        "vision.blocks.0.hook_attn_out",
        "vision.ln_post.hook_normalized",
        "vision.hook_features",
        "projector.hook_in",
        "projector.hook_out",
        "hook_image_embeds",
    } <= set(model.hook_dict)
    names = ["vision.hook_features", "projector.hook_in", "hook_image_embeds"]
    _, cache = model.run_with_cache(inp, names_filter=names)
    assert cache["vision.hook_features"].shape == (5, 64, 32)  # 4 tiles + thumbnail, 8 x 8
    assert cache["projector.hook_in"].shape == (5, 16, 128)  # 2 x 2 patches per token
    assert cache["hook_image_embeds"].shape == (5, 16, model.cfg.d_model)


def test_pixel_shuffle_orders_channels_as_hf():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    features = torch.randn(3, 8, 8, 5)  # [crop, rows, cols, d]
    expected = InternVLModel.pixel_shuffle(None, features, scale_factor=0.5)  # uses no state
    assert torch.equal(pixel_shuffle(features, 2), expected)


def test_prepare_gives_hf_pixels_the_expansion_rule_and_the_chat_template(folder, model, images):
    question = "What colour is the star?"
    inp = model.prepare([images["wide"], images["square"]], [question, "Why?"])
    # HF's image processor as InternVLProcessor calls it (crop_to_patches on).
    reference = GotOcr2ImageProcessorPil.from_pretrained(folder)(
        [images["wide"], images["square"]], crop_to_patches=True, return_tensors="pt"
    )
    assert reference["num_patches"].tolist() == [3, 5] and inp.pixel_rows == [3, 5]
    assert torch.equal(inp.pixel_values, reference["pixel_values"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert inp.prompts[0] == rendered  # the checkpoint's chat template
    # InternVLProcessor.replace_image_token: <img>, image_seq_length tokens per crop, </img>.
    expanded = rendered.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * 16 * 3 + "</img>")
    real = inp.attention_mask[0].bool()
    assert inp.input_ids[0][real].tolist() == tokenizer(expanded)["input_ids"]
    assert int((inp.input_ids[1] == model.cfg.image_token_id).sum()) == 16 * 5
    assert model.to_string(inp.input_ids[0, inp.positions("question", 0)]) == question
    assert model.to_string(inp.input_ids[0, inp.positions("last", 0)]) == "\n"
    first = int(inp.positions("image", 0)[0])
    assert model.to_string(inp.input_ids[0, first - 1]) == "<img>"
    assert model.to_string(inp.input_ids[0, int(inp.positions("image", 0)[-1]) + 1]) == "</img>"


def test_one_image_matches_hf(hf, model, images):
    assert_matches_hf(hf, model, model.prepare(images["square"], "What colour is the star?"))


def test_padded_batch_of_two_tile_counts_matches_hf(hf, model, images):
    inp = model.prepare(
        [images["wide"], images["square"]], ["What colour is the star in the corner?", "Why?"]
    )
    assert not inp.attention_mask.bool().all() and inp.pixel_rows == [3, 5]
    assert_matches_hf(hf, model, inp)


def test_a_one_crop_image_and_a_text_only_item_match_hf(hf, model, images):
    inp = model.prepare([images["small"], None], ["What is it?", "Hello there, who are you?"])
    assert inp.pixel_rows == [1] and inp.image_geometry[0].tile_grid is None
    assert_matches_hf(hf, model, inp)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_hf(hf, model, images, batch):
    prompts = ["What colour is the star?", "Why?"][:batch]
    inp = model.prepare([images["wide"], images["square"]][:batch], prompts)
    ours = model.generate(inp, max_new_tokens=6, stop_at_eos=False)
    with torch.no_grad():
        theirs = hf.generate(
            **inp.model_kwargs(), max_new_tokens=6, min_new_tokens=6, do_sample=False
        )
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "variant",
    [
        dict(norm_type="rms_norm", use_qk_norm=False, use_mean_pooling=True),
        dict(decoder="qwen3", tie_word_embeddings=True),
        dict(decoder="llama"),
    ],
    ids=["rms-norm-no-qk-norm-mean-pooling", "qwen3-decoder-tied", "llama-decoder"],
)
def test_other_towers_and_decoders_match_hf(tmp_path, images, variant):
    folder = build_tiny_internvl(tmp_path, **variant, seed=1)
    model = mmlens.from_pretrained(folder)
    assert model.cfg.vision.has_ln_post == (not variant.get("use_mean_pooling", False))
    assert model.cfg.decoder_model_type == variant.get("decoder", "qwen2")
    hf = InternVLForConditionalGeneration.from_pretrained(folder).eval()
    inp = model.prepare([images["wide"], images["small"]], ["Why?", "What is it in the corner?"])
    assert_matches_hf(hf, model, inp)
    ours = model.generate(inp, max_new_tokens=4, stop_at_eos=False)
    with torch.no_grad():
        theirs = hf.generate(
            **inp.model_kwargs(), max_new_tokens=4, min_new_tokens=4, do_sample=False
        )
    assert torch.equal(ours, theirs)


def test_the_layout_has_tiles_then_the_thumbnail(model, images):
    inp = model.prepare(images["square"], "Why?")  # 2 x 2 tiles
    layout, image = inp.layout, inp.positions("image")
    assert layout.tile.tolist() == [t for t in (1, 2, 3, 4, 0) for _ in range(16)]
    assert torch.equal(layout.position, image)
    # The thumbnail (tile 0, the base grid) comes last in the sequence.
    assert torch.equal(layout.patch_grid(0).flatten(), image[-16:])
    high = layout.highres_grid(0)  # the tiles side by side: 8 x 8 tokens
    assert high.shape == (8, 8)
    assert torch.equal(high[:SIDE, SIDE:].flatten(), image[16:32])  # tile 2: top right
    assert torch.equal(high[SIDE:, :SIDE].flatten(), image[32:48])  # tile 3: bottom left
    assert torch.equal(layout.patch_grid(0, tile=4), high[SIDE:, SIDE:])


def test_boxes_map_onto_every_tile_they_overlap_and_the_thumbnail(model, images):
    inp = model.prepare(images["wide"], "Why?")  # 90 x 40 -> tiles 56 x 112 (1 x 2), thumb 56
    layout = inp.layout
    high, thumb = layout.highres_grid(0), layout.patch_grid(0)

    def positions(*grids):
        return sorted(int(p) for grid in grids for p in grid.flatten())

    # x 0..45 -> canvas 0..56 (tile 1, columns 0-3) and thumbnail 0..28 (columns 0-1);
    # y 0..20 -> 0..28 in both (rows 0-1).
    assert inp.patches_in_box((0, 0, 45, 20)).tolist() == positions(high[:2, :4], thumb[:2, :2])
    # x 40..50 -> canvas 49.8..62.2: the last column of tile 1 and the first of tile 2;
    # thumbnail 24.9..31.1 (columns 1-2). y 0..10 -> 0..14: row 0.
    hit = inp.patches_in_box((40, 0, 50, 10))
    assert set(layout.tile[torch.isin(layout.position, hit)].tolist()) == {0, 1, 2}
    assert hit.tolist() == positions(high[:1, 3:5], thumb[:1, 1:3])


def painted_tokens(folder, inp, box) -> torch.Tensor:
    """The image tokens of every crop that hold a pixel of `box`, painted red on black and sent
    through HF's image processor (nearest resampling, no normalisation): the positions."""
    width, height = inp.image_geometry[0].original_size[::-1]
    mask = Image.new("RGB", (width, height))
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
    processor = GotOcr2ImageProcessorPil.from_pretrained(folder)
    crops = processor(
        mask, crop_to_patches=True, resample=PILImageResampling.NEAREST, do_rescale=False,
        do_normalize=False, return_tensors="pt",
    )["pixel_values"]  # fmt: skip
    red = (crops[:, 0] == 255) & (crops[:, 1] == 0)
    cell = 14
    hits = red.reshape(len(crops), SIDE, cell, SIDE, cell).any(4).any(2)  # crop, row, col
    return inp.positions("image")[hits.flatten()]  # crops in order, each row-major


@pytest.mark.parametrize("box", [(0, 0, 45, 20), (40, 0, 50, 10), (60, 25, 90, 40)])
def test_boxes_agree_with_a_painted_mask(folder, model, images, box):
    inp = model.prepare(images["wide"], "Why?")
    geometric, painted = inp.patches_in_box(box), painted_tokens(folder, inp, box)
    tiles = inp.layout.position[inp.layout.tile >= 1]
    # Enlarged (the canvas): the same tokens; shrunk (the thumbnail): nearest resampling
    # keeps a subset of the pixels the geometric rule counts.
    assert torch.equal(geometric[torch.isin(geometric, tiles)], painted[torch.isin(painted, tiles)])
    assert set(painted.tolist()) <= set(geometric.tolist())


def test_dropping_the_image_equals_knocking_it_out(model, images):
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
    assert (model(inp)[:, -1] - knocked[:, -1]).abs().max() > 1e-3  # the image mattered


def test_an_item_of_a_batch_keeps_its_crops(model, images):
    inp = model.prepare([images["wide"], None, images["square"]], ["Why?", "Hi", "Is it red?"])
    assert inp.pixel_rows == [3, 5]
    for index, image in ((0, "wide"), (2, "square")):
        alone = model.prepare(images[image], ["Why?", "Hi", "Is it red?"][index])
        item = inp.item(index)
        assert torch.equal(item.pixel_values, alone.pixel_values)
        assert torch.equal(item.input_ids, alone.input_ids)
        torch.testing.assert_close(model(item)[0, -1], model(inp)[index, -1], atol=1e-4, rtol=0)


def test_the_knockout_sweep_engine_equals_full_runs(model, images):
    inp = model.prepare(images["wide"], "What colour is the star?", preset=CROSS_MODAL_FLOW)
    kwargs = dict(boxes=[[(0, 0, 45, 20)]], preset=CROSS_MODAL_FLOW, progress=False)
    engine = knockout_sweep(model, inp, method="engine", **kwargs)
    naive = knockout_sweep(model, inp, method="naive", **kwargs)
    assert engine.attrs["patch_rule"] == "geometric"
    assert {"Related patches→Question", "Image→Last"} <= set(engine["flow"])
    assert (engine["p_new"] - naive["p_new"]).abs().max() < 1e-5


def cam_by_hand(hf, model, inp, answer) -> dict[str, torch.Tensor]:
    """Grad-CAM through HF's modules at decoder layer 0 and vision block 0, on the thumbnail's
    patches (``"base"``) and on the tiles' patches side by side (``"high"``), each tile's and
    each token's place written out here, not taken from mmlens' packing."""
    forced = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, answer))
    modules = [
        hf.model.vision_tower.encoder.layer[0].layernorm_after,
        hf.model.language_model.layers[0].post_attention_layernorm,
    ]
    outputs, gradients = hf_answer_gradients(
        hf, forced.model_kwargs(), modules, inp.input_ids.shape[1]
    )
    (rows, cols), n_tiles, patches = inp.image_geometry[0].grid.tiles, 2, 2 * SIDE
    image = inp.positions("image")
    # Vision: crop t < n_tiles is tile t (row-major), the last crop the thumbnail; CLS first.
    crop, patch = torch.zeros(rows * patches, cols * patches, dtype=torch.long), None
    patch = torch.zeros_like(crop)
    for r in range(rows * patches):
        for c in range(cols * patches):
            crop[r, c] = (r // patches) * cols + c // patches
            patch[r, c] = 1 + (r % patches) * patches + c % patches
    # Decoder: tile t's tokens are image positions t * 16 ..., the thumbnail's the last 16.
    token = torch.zeros(rows * SIDE, cols * SIDE, dtype=torch.long)
    for r in range(rows * SIDE):
        for c in range(cols * SIDE):
            tile = (r // SIDE) * cols + c // SIDE
            token[r, c] = image[tile * 16 + (r % SIDE) * SIDE + c % SIDE]
    vision, vision_grad = outputs[0].detach(), gradients[0]
    decoder, decoder_grad = outputs[1][0].detach(), gradients[1][0]

    def grad_cam(features, grads, shape):
        flat, flat_grad = (
            features.reshape(-1, features.shape[-1]),
            grads.reshape(-1, grads.shape[-1]),
        )
        return (flat @ flat_grad.mean(0)).relu().reshape(shape)

    def blocks(token_map):
        return token_map.repeat_interleave(2, 0).repeat_interleave(2, 1)

    base_vision = grad_cam(vision[n_tiles, 1:], vision_grad[n_tiles, 1:], (patches, patches))
    thumb = image[-16:]
    base_decoder = blocks(grad_cam(decoder[thumb], decoder_grad[thumb], (SIDE, SIDE)))
    high_vision = grad_cam(vision[crop, patch], vision_grad[crop, patch], crop.shape)
    high_decoder = blocks(grad_cam(decoder[token], decoder_grad[token], token.shape))

    def normalised(maps):
        maps = torch.stack(maps)
        return maps / maps.amax((1, 2), keepdim=True)

    return {
        "base": normalised([base_decoder, base_vision]),
        "high": normalised([high_decoder, high_vision]),
    }


def test_llava_cam_equals_grad_cam_through_hf_on_thumbnail_and_tiles(hf, model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    answer = "red car"
    cam = llava_cam(model, inp, answer, layers=[0, "vision.blocks.0"], noise_std=0)
    expected = cam_by_hand(hf, model, inp, answer)
    assert cam.maps.shape == (2, 8, 8) and cam.highres_maps.shape == (2, 8, 16)
    assert cam.settings["cells_per_token"] == [2, 2]
    assert expected["high"].flatten(1).std(1).min() > 0.05  # maps with structure
    torch.testing.assert_close(cam.maps, expected["base"], atol=5e-5, rtol=0)
    torch.testing.assert_close(cam.highres_maps, expected["high"], atol=5e-5, rtol=0)
    # Both grids cover the whole image: stretched back onto it (height, width).
    assert cam.on_image().shape == (2, 40, 90) and cam.on_image(highres=False).shape == (2, 40, 90)
    assert torch.equal(model.vision_pixels(inp), inp.pixel_values[2])  # the thumbnail
    figure = mmlens.plot.llava_cam(cam, inp)
    assert figure.data[0].source.startswith("data:image/png")


def test_attention_maps_on_the_thumbnail_and_the_tiles(model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    maps = last_row_attention_maps(model, inp)  # on the thumbnail's token grid
    assert maps.shape == (model.cfg.n_layers, SIDE, SIDE)
    _, cache = model.run_with_cache(inp, names_filter=["blocks.0.attn.hook_pattern"])
    row = cache["blocks.0.attn.hook_pattern"][0, :, -1].mean(0)
    assert torch.equal(maps[0], row[inp.layout.patch_grid(0)])
    # The tiles' tokens assembled on the canvas, which covers the whole image.
    high = row[inp.layout.highres_grid(0)]
    assert high.shape == (SIDE, 2 * SIDE) and (high > 0).all()
    on_image = torch.nn.functional.interpolate(high[None, None], size=(40, 90))[0, 0]
    assert on_image.shape == (40, 90)


def test_the_runner_runs_on_it(folder, tmp_path):
    result = mmlens.run(
        "knockout", folder, "shapes:3", tmp_path / "run", window_size=1, progress=False
    )
    assert set(result.flow) >= {"Image→Last", "Question→Last"} and len(result) > 0


def test_the_papers_presets_prepare_its_inputs(model, images):
    for preset in (CROSS_MODAL_FLOW, REDUNDANCY_TO_RELEVANCE):
        inp = model.prepare(images["wide"], "Is the door red?", preset=preset)
        assert inp.settings["tokenization"] == "hf" and inp.settings["image_mode"] is None
        assert inp.prompts[0].startswith("<|im_start|>user\n<IMG_CONTEXT>")
        preset.check_input(model, inp)
        assert preset.patch_rule_for(model)[0] == "geometric"


def test_the_demo_report_runs_on_it(model, tmp_path):
    from mmlens.report import write_report
    from mmlens.zoo.shapes import generate

    path = write_report(model, generate(4, seed=1), tmp_path / "report.html", progress=False)
    html = path.read_text()
    assert "LLaVA-CAM" in html and "Related patches" in html and len(html) > 100_000


def test_two_images_in_one_prompt_match_hf(hf, model, images):
    inp = model.prepare(
        [images["wide"], images["square"]], "Is <IMG_CONTEXT> the same as <IMG_CONTEXT>?"
    )
    assert inp.n_images == 2 and len(inp.positions("image")) == 16 * (3 + 5)
    assert_matches_hf(hf, model, inp)
    row, index = model.vision_patch_index(inp, 1)
    assert row == 3 + 5 - 1 and index.shape == (8, 8) and int(index[0, 0]) == 1


def test_options_that_do_not_apply_are_errors_that_say_so(model, images):
    with pytest.raises(ValueError, match="image_mode='pad' does not apply.*InternVL"):
        model.prepare(images["wide"], "Why?", image_mode="pad")
    with pytest.raises(ValueError, match="places its image tokens itself"):
        model.prepare(images["wide"], "Why?", tokenization="llava")
    with pytest.raises(ValueError, match="rule='mask' needs a single-crop input"):
        model.prepare(images["wide"], "Why?").patches_in_box((0, 0, 10, 10), rule="mask")
    with pytest.raises(ValueError, match="rows of flattened patches or of crops"):
        model.prepare(images["small"], "Why?").patches_in_box((0, 0, 10, 10), rule="mask")
    with pytest.raises(ValueError, match="1 image\\(s\\) for 2 '<IMG_CONTEXT>'"):
        model.processor(images=[images["wide"]], text=["<IMG_CONTEXT><IMG_CONTEXT>"])
