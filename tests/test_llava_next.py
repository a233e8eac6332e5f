"""LLaVA-NeXT: parity with HF's LlavaNextForConditionalGeneration, image-token layout and
patches_in_box against HF's own packing and a mask-image oracle.

Every model check loads the same saved checkpoint twice: through HF and through mmlens' own
loading path. fp32 tolerance is 1e-4 on logits and on every layer's residual stream at real
(non-pad) positions. Images cover wide, tall and square aspect ratios, tile grids 1x2, 1x3, 3x1
and 2x2, with and without unpadding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_inputs import assert_equal, has_resampling_tie, oracle_boxes  # DESIGN §4 oracle machinery
from transformers import AutoProcessor, LlavaNextForConditionalGeneration
from transformers.image_utils import PILImageResampling

import mmlens
from mmlens import testing as mmlens_testing
from mmlens.inputs import NEWLINE, PATCH, MultimodalInput
from mmlens.models.llava_next.geometry import AnyresGeometry
from mmlens.testing import make_test_image

TOLERANCE = 1e-4
PATCHES_PER_CROP = 4  # build_tiny_llava_next: 28 px crops, 7 px patches

# (width, height) -> tile grid, kept canvas rows, kept canvas columns: worked out by hand from
# llava-v1.6's rules (best canvas, aspect-preserving fit, unpadding in patch units). None of these
# sizes has a resampling tie, so the box-filter mask oracle is exact for all of them.
IMAGE_CASES = {
    "wide-1x3-unpad": ((96, 40), (1, 3), range(0, 4), range(1, 11)),  # 96 * 4/40 = 9.6 -> 9 cols
    "tall-3x1-unpad": ((40, 96), (3, 1), range(1, 11), range(0, 4)),
    "square-2x2": ((56, 56), (2, 2), range(0, 8), range(0, 8)),
    "wide-2x2-unpad": ((64, 48), (2, 2), range(1, 7), range(0, 8)),  # 48 * 8/64 = 6 rows
    "tall-2x2-unpad": ((48, 64), (2, 2), range(0, 8), range(1, 7)),
    "small-square-1x2-unpad": ((22, 22), (1, 2), range(0, 4), range(2, 6)),  # enlarged
    "very-wide-1x3": ((120, 40), (1, 3), range(0, 4), range(0, 12)),
}
PARITY_CASES = ["wide-1x3-unpad", "tall-3x1-unpad", "square-2x2", "small-square-1x2-unpad"]

CONFIGS = {  # decoders of llava-v1.6-vicuna (MHA), -mistral and llama3-llava-next (GQA)
    "vicuna-mha": dict(family="vicuna"),
    "mistral-gqa": dict(family="mistral", n_kv_heads=2),
    "llama3-gqa": dict(family="llama3", n_kv_heads=2, vision_feature_layer=[-2, -1]),
}
QUESTIONS = ["What colour is the door?", "Is there a red circle in the top left corner?"]


def case_image(case: str, seed: int = 0) -> Image.Image:
    (width, height), *_ = IMAGE_CASES[case]
    return make_test_image(width, height, seed)


@pytest.fixture(scope="module", params=list(CONFIGS))
def loaded(request, tiny_next_checkpoint):
    folder = tiny_next_checkpoint(**CONFIGS[request.param])
    hf = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def vicuna(tiny_next_checkpoint):
    folder = tiny_next_checkpoint(family="vicuna")
    hf = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return hf, mmlens.from_pretrained(folder), AutoProcessor.from_pretrained(folder)


def assert_matches_hf(hf, model, inp: MultimodalInput) -> None:
    """Logits, every layer's residual stream and the packed image features, at real positions."""
    out, cache = mmlens_testing.assert_matches_hf(hf, model, inp, TOLERANCE)
    # hook_image_embeds is HF's packed image features: [1, n_image_tokens, d_model].
    image_embeds = cache["hook_image_embeds"]
    assert image_embeds.shape == (1, len(inp.layout), model.cfg.d_model)
    assert (image_embeds[0] - mmlens_testing.hf_image_features(out)).abs().max() < TOLERANCE


# --- model: parity with HF -------------------------------------------------------------------


def test_loads_as_hooked_llava_next_with_the_checkpoint_newline(loaded):
    hf, model = loaded
    assert type(model) is mmlens.HookedLlavaNext and isinstance(model, mmlens.HookedLlava)
    assert torch.equal(model.image_newline, hf.model.image_newline)
    assert model.cfg.image_grid_pinpoints == hf.config.image_grid_pinpoints
    assert (
        model.default_template
        == {
            "llama": "vicuna_v1" if "<s>" in model.tokenizer.get_vocab() else "llama3",
            "mistral": "mistral_instruct",
        }[model.cfg.decoder_model_type]
    )


@pytest.mark.parametrize("case", PARITY_CASES)
def test_single_image_matches_hf(loaded, case):
    hf, model = loaded
    inp = model.prepare(case_image(case), QUESTIONS[0])
    (width, height), tiles, kept_rows, kept_cols = IMAGE_CASES[case]
    n_base = PATCHES_PER_CROP**2
    assert len(inp.positions("image")) == n_base + len(kept_rows) * (len(kept_cols) + 1)
    assert inp.pixel_values.shape == (1, 1 + tiles[0] * tiles[1], 3, 28, 28)
    assert_matches_hf(hf, model, inp)


def test_padded_batch_of_two_image_sizes_matches_hf(loaded):
    hf, model = loaded
    images = [case_image("wide-1x3-unpad"), case_image("square-2x2", seed=1)]
    inp = model.prepare(images, QUESTIONS)
    counts = [len(inp.positions("image", item)) for item in range(2)]
    assert counts == [16 + 4 * 11, 16 + 8 * 9]  # different image-token counts ...
    assert inp.attention_mask[0].sum() < inp.attention_mask.shape[1]  # ... so item 0 is padded
    assert inp.pixel_values.shape[:2] == (2, 5)  # 1 + 3 crops, padded to 1 + 4
    assert_matches_hf(hf, model, inp)


def test_padded_item_equals_item_alone(loaded):
    _, model = loaded
    images = [case_image("tall-3x1-unpad"), case_image("very-wide-1x3", seed=1)]
    batch = model.prepare(images, QUESTIONS)
    with torch.no_grad():
        batch_logits = model(batch)
        for item in range(2):
            alone = model.prepare(images[item], QUESTIONS[item])
            n_real = int(alone.attention_mask.sum())
            difference = batch_logits[item, -n_real:] - model(alone)[0]
            assert difference.abs().max() < TOLERANCE


def test_greedy_generation_matches_hf(loaded):
    hf, model = loaded
    images = [case_image("tall-2x2-unpad", seed=2), case_image("small-square-1x2-unpad", seed=3)]
    inp = model.prepare(images, QUESTIONS)
    with torch.no_grad():
        expected = hf.generate(**inp.model_kwargs(), max_new_tokens=10, do_sample=False)
    tokens = model.generate(inp, max_new_tokens=10)
    assert tokens.shape == expected.shape and tokens.shape[1] > inp.input_ids.shape[1] + 1
    assert torch.equal(tokens, expected)


def test_text_only_item_in_a_batch_with_an_image_matches_hf(vicuna):
    hf, model, _ = vicuna
    inp = model.prepare([None, case_image("wide-2x2-unpad")], QUESTIONS)
    assert len(inp.positions("image", 0)) == 0 and inp.image_items == [1]
    assert_matches_hf(hf, model, inp)


def test_bfloat16_matches_hf_bfloat16_and_stays_close_to_fp32(tiny_next_checkpoint):
    folder = tiny_next_checkpoint(**CONFIGS["llama3-gqa"])
    model32 = mmlens.from_pretrained(folder)
    model16 = mmlens.from_pretrained(folder, dtype=torch.bfloat16)
    hf16 = LlavaNextForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert model16.image_newline.dtype == torch.bfloat16
    inp = model32.prepare(case_image("wide-2x2-unpad"), QUESTIONS[0])
    with torch.no_grad():
        logits32, logits16 = model32(inp), model16(inp).float()
        hf_logits16 = hf16(**inp.model_kwargs()).logits.float()
    assert torch.isfinite(logits16).all()
    # Same bf16 rounding as HF, op for op: agreement far tighter than bf16's own error.
    assert (logits16 - hf_logits16).abs().max() < 1e-2 * logits32.abs().max()
    relative_error = (logits16 - logits32).abs().mean() / logits32.abs().mean()
    assert relative_error < 0.05


# --- model: hooks and inputs -----------------------------------------------------------------


def test_vision_and_projector_hooks_see_every_crop(vicuna):
    _, model, _ = vicuna
    images = [case_image("wide-1x3-unpad"), case_image("square-2x2")]
    inp = model.prepare(images, QUESTIONS)
    _, cache = model.run_with_cache(
        inp, names_filter=lambda name: "hook_embed" in name or "projector" in name
    )
    n_crops = (1 + 3) + (1 + 4)  # base + tiles of each image; the padding crop is skipped
    assert cache["vision.hook_embed"].shape == (n_crops, 1 + 16, 32)
    assert cache["projector.hook_out"].shape == (n_crops, 16, model.cfg.d_model)


def test_hook_image_embeds_rows_follow_the_layout(vicuna):
    """Row i of hook_image_embeds is layout entry i: the newline rows hold image_newline, and
    replacing them through the hook equals a model whose image_newline is that value."""
    _, model, _ = vicuna
    inp = model.prepare([case_image("tall-2x2-unpad"), case_image("wide-1x3-unpad")], QUESTIONS)
    is_newline = inp.layout.kind == NEWLINE
    assert int(is_newline.sum()) == 8 + 4
    _, cache = model.run_with_cache(inp, names_filter="hook_image_embeds")
    newline_rows = cache["hook_image_embeds"][0, is_newline]
    assert torch.equal(newline_rows, model.image_newline.expand_as(newline_rows))

    def zero_newlines(image_embeds, hook):
        image_embeds[0, is_newline] = 0.0
        return image_embeds

    with torch.no_grad():
        hooked = model.run_with_hooks(inp, fwd_hooks=[("hook_image_embeds", zero_newlines)])
        saved = model.image_newline.detach().clone()
        model.image_newline.zero_()
        try:
            zeroed = model(inp)
        finally:
            model.image_newline.copy_(saved)
        clean = model(inp)
    assert torch.equal(hooked, zeroed)
    assert (hooked - clean).abs().max() > 1e-3


def test_model_accepts_the_real_crops_flattened(vicuna):
    _, model, _ = vicuna
    images = [case_image("wide-1x3-unpad"), case_image("square-2x2")]
    inp = model.prepare(images, QUESTIONS)
    crops = torch.cat([inp.pixel_values[0, :4], inp.pixel_values[1, :5]])
    kwargs = {**inp.model_kwargs(), "pixel_values": crops}
    with torch.no_grad():
        assert torch.equal(model(**kwargs), model(inp))
        as_list = {**kwargs, "image_sizes": inp.image_sizes.tolist()}
        assert torch.equal(model(**as_list), model(inp))


def test_errors_name_the_problem_and_the_fix(vicuna):
    _, model, _ = vicuna
    inp = model.prepare(case_image("square-2x2"), QUESTIONS[0])
    kwargs = inp.model_kwargs()
    with pytest.raises(ValueError, match="needs image_sizes.*model.prepare"):
        model(input_ids=inp.input_ids, pixel_values=inp.pixel_values)
    with pytest.raises(ValueError, match=r"give 60 image embeddings but the input has 88.*expand"):
        model(**{**kwargs, "image_sizes": torch.tensor([[40, 96]])})
    with pytest.raises(ValueError, match=r"do not fit image_sizes.*\[5, 5\] crops"):
        model(**{**kwargs, "image_sizes": torch.tensor([[56, 56], [56, 56]])})
    with pytest.raises(ValueError, match="expected \\[n_images, max_crops"):
        model(**{**kwargs, "pixel_values": inp.pixel_values[0, :3]})
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(input_ids=inp.input_ids)


def test_loading_checks_the_class(tiny_checkpoint, tiny_next_checkpoint):
    next_folder = tiny_next_checkpoint(family="vicuna")
    assert type(mmlens.HookedLlava.from_pretrained(next_folder)) is mmlens.HookedLlavaNext
    with pytest.raises(
        TypeError, match="'llava' checkpoint, which loads as HookedLlava, not Hooked"
    ):
        mmlens.HookedLlavaNext.from_pretrained(tiny_checkpoint())
    cfg = mmlens.from_pretrained(tiny_checkpoint()).cfg
    with pytest.raises(ValueError, match="needs cfg.image_grid_pinpoints"):
        mmlens.HookedLlavaNext(cfg)


# --- layout: every image token, checked against HF's own packing -----------------------------


def hf_packed(hf, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor):
    """HF's `pack_image_features` applied to per-crop marker features ``[n_crops, 16, dim]``:
    the marker of each image token, in the model's order (newline tokens get `newline`)."""
    with torch.no_grad():
        packed, _ = hf.model.pack_image_features(
            features, image_sizes, vision_feature_select_strategy="default", image_newline=newline
        )
    return torch.cat(packed)


def crop_coordinates(n_crops: int) -> torch.Tensor:
    """``[n_crops, 16, 3]``: (crop, row in crop, column in crop) of every patch, row-major."""
    crop, row, col = torch.meshgrid(
        torch.arange(n_crops),
        torch.arange(PATCHES_PER_CROP),
        torch.arange(PATCHES_PER_CROP),
        indexing="ij",
    )
    return torch.stack([crop, row, col], dim=-1).reshape(n_crops, -1, 3).float()


def test_layout_kinds_tiles_rows_and_columns_follow_hf_packing(vicuna):
    hf, model, processor = vicuna
    cases = list(IMAGE_CASES)
    inp = MultimodalInput.from_processor(
        processor, [case_image(case) for case in cases], [QUESTIONS[0]] * len(cases)
    )
    n_crops = [1 + tiles[0] * tiles[1] for _, tiles, _, _ in IMAGE_CASES.values()]
    expected = hf_packed(
        hf, [crop_coordinates(n) for n in n_crops], inp.image_sizes, torch.tensor([-1.0] * 3)
    ).long()
    layout = inp.layout
    assert len(layout) == len(expected)  # all images' tokens, in the order HF packs them
    crop, crop_row, crop_col = expected.unbind(-1)
    for image, case in enumerate(cases):
        _, (tiles_high, tiles_wide), kept_rows, kept_cols = IMAGE_CASES[case]
        mine = layout.image == image
        assert_equal(layout.position[mine], inp.positions("image", item=image))
        assert (layout.item[mine] == image).all()
        kind, tile, row, col = (
            getattr(layout, name)[mine] for name in ("kind", "tile", "row", "col")
        )
        e_crop, e_row, e_col = crop[mine], crop_row[mine], crop_col[mine]
        is_newline = e_crop == -1
        assert_equal(kind, torch.where(is_newline, NEWLINE, PATCH))
        assert_equal(tile, e_crop)  # crop 0 = base, 1.. = tiles, -1 = newline
        base = e_crop == 0
        assert_equal(row[base], e_row[base]) and assert_equal(col[base], e_col[base])
        tile_patch = e_crop >= 1
        canvas_row = (e_crop[tile_patch] - 1) // tiles_wide * PATCHES_PER_CROP + e_row[tile_patch]
        canvas_col = (e_crop[tile_patch] - 1) % tiles_wide * PATCHES_PER_CROP + e_col[tile_patch]
        assert_equal(row[tile_patch], canvas_row - kept_rows.start)
        assert_equal(col[tile_patch], canvas_col - kept_cols.start)
        assert int(is_newline.sum()) == len(kept_rows)
        assert_equal(row[is_newline], torch.arange(len(kept_rows)))
        assert (col[is_newline] == -1).all()
        grid = layout.highres_grid(image)
        assert grid.shape == (len(kept_rows), len(kept_cols)) and (grid >= 0).all()
        assert_equal(grid.flatten(), layout.position[mine][tile_patch])
        assert tiles_high * tiles_wide == int(tile.max())


def test_geometry_predicts_the_processor(vicuna):
    """Token counts and crops from `AnyresGeometry` equal what HF's processor produced."""
    _, _, processor = vicuna
    for case, ((width, height), tiles, kept_rows, kept_cols) in IMAGE_CASES.items():
        geometry = AnyresGeometry.from_image_processor(
            processor.image_processor, (height, width), 7
        )
        assert geometry.grid.tiles == tiles and geometry.grid.kept_rows == kept_rows, case
        assert geometry.grid.kept_cols == kept_cols, case
        encoded = processor(images=case_image(case), text="<image>", return_tensors="pt")
        n_tokens = int((encoded.input_ids == processor.image_token_id).sum())
        assert geometry.n_image_tokens(has_cls=False) == n_tokens, case
        assert encoded.pixel_values.shape[1] == 1 + geometry.grid.n_tiles


def test_layout_helpers(vicuna):
    _, _, processor = vicuna
    inp = MultimodalInput.from_processor(processor, case_image("wide-1x3-unpad"), QUESTIONS[0])
    layout = inp.layout
    assert layout.patch_grid(0, tile=0).shape == (4, 4)
    # Tile 1 (left) lost its first column to unpadding, tile 2 (middle) lost nothing.
    assert layout.patch_grid(0, tile=1).shape == (4, 3)
    assert_equal(layout.patch_grid(0, tile=2).flatten(), layout.highres_grid(0)[:, 3:7].flatten())
    assert set(layout.kind_names()) == {"patch", "newline"}
    with pytest.raises(
        ValueError, match="no patch tokens for image 0, tile 4.*tiles \\[0, 1, 2, 3\\]"
    ):
        layout.patch_grid(0, tile=4)


# --- patches_in_box against the mask-image oracle (docs/semantics.md) --------------------------


def anyres_box_oracle(hf, processor, size: tuple[int, int], boxes: list) -> list[torch.Tensor]:
    """For each box, which image tokens show it (booleans in the model's token order).

    Each box is painted white into a black mask of the original size; the masks and an all-black
    image go through the LLaVA-NeXT image processor (same base crop, canvas fit, padding and
    tiling) with normalisation off and PIL's box filter (see test_inputs.box_oracle for why);
    a patch of a crop shows the box if any of its processed values differs from the black
    image's. HF's own `pack_image_features` then puts the per-patch hits into the model's token
    order, unpadding included (newline tokens never hit).
    """
    width, height = size
    masks = [np.zeros((height, width, 3), np.uint8)]
    for x0, y0, x1, y1 in boxes:
        mask = np.zeros((height, width, 3), np.uint8)
        mask[y0:y1, x0:x1] = 255
        masks.append(mask)
    pixels = processor.image_processor(
        [Image.fromarray(mask) for mask in masks],
        resample=PILImageResampling.BOX,
        do_normalize=False,
        return_tensors="pt",
    )["pixel_values"]  # [1 + n_boxes, n_crops, 3, 28, 28]
    changed = (pixels[1:] - pixels[:1]).abs().amax(dim=2) > 0
    side = PATCHES_PER_CROP
    hits = changed.reshape(len(boxes), -1, side, 7, side, 7).any(dim=(3, 5))
    features = [hit.reshape(hit.shape[0], side * side, 1).float() for hit in hits]
    image_sizes = torch.tensor([[height, width]] * len(boxes))
    packed = hf_packed(hf, features, image_sizes, torch.tensor([0.0]))
    return list(packed.reshape(len(boxes), -1).bool())


def test_oracle_sizes_have_no_resampling_ties(vicuna):
    _, _, processor = vicuna
    for (width, height), *_ in IMAGE_CASES.values():
        geometry = AnyresGeometry.from_image_processor(
            processor.image_processor, (height, width), 7
        )
        for view in (geometry.base, geometry.canvas):
            for axis in (0, 1):
                assert not has_resampling_tie(view.padded_size[axis], view.resized_size[axis])


@pytest.mark.parametrize("case", list(IMAGE_CASES))
def test_patches_in_box_matches_the_mask_oracle(vicuna, case):
    hf, _, processor = vicuna
    (width, height), *_ = IMAGE_CASES[case]
    inp = MultimodalInput.from_processor(processor, case_image(case, seed=7), QUESTIONS[0])
    image_positions = inp.positions("image")
    boxes = oracle_boxes(width, height, seed=len(case))
    for box, hit in zip(
        boxes, anyres_box_oracle(hf, processor, (width, height), boxes), strict=True
    ):
        actual = inp.patches_in_box(box)
        assert_equal(actual, image_positions[hit])
        tiles = inp.layout.tile[torch.isin(inp.layout.position, actual)]
        assert (tiles == 0).any() and (tiles >= 1).any()  # both views show every pixel
