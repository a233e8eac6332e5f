"""A dry run of a new family: one module's worth of code, written here, and nothing else.

The family is a LLaVA whose connector averages each 2 x 2 block of vision patches before the
projector (the spatial merge of Qwen2-VL's patch merger, in its simplest form). It declares a
model type, its processor and its image geometry (one image token per merged cell) and its
image embeddings, and no file of mmlens changes: loading, `prepare`, `patches_in_box`, the
knockout sweep, LLaVA-CAM, the attention maps, the box scores, the presets and the report's
flows all reach it through the family contract (docs/architecture.md, "Adding a model family").
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import einops
import pytest
import torch
from transformers import AutoConfig, LlavaConfig, LlavaProcessor

import mmlens
from mmlens.analysis import box_scores, knockout_sweep, last_row_attention_maps, llava_cam
from mmlens.models.family import ImageTokenGeometry, VisionLanguageFamily
from mmlens.models.registry import MODEL_TYPES, register
from mmlens.presets import CROSS_MODAL_FLOW
from mmlens.testing import make_test_image

MERGE = 2


# --- the family: what a new module under mmlens/models/ would hold -------------------------


class PooledLlavaConfig(LlavaConfig):
    model_type = "pooled_llava"


@register("pooled_llava")
class HookedPooledLlava(mmlens.HookedLlava):
    """LLaVA with the vision features of each 2 x 2 block of patches averaged: a quarter of the
    image tokens, each showing a merged cell (a patch of twice the side)."""

    paper_window_sizes = {"cross_modal_flow": {"pooled": 3}}

    @classmethod
    def load_processor(cls, folder: Any, hf_config: Any) -> LlavaProcessor:
        """LLaVA's processor counting one token per merged cell."""
        patch = hf_config.vision_config.patch_size * MERGE
        return LlavaProcessor.from_pretrained(folder, patch_size=patch)

    @property
    def token_patch_size(self) -> int:
        return self.cfg.vision.patch_size * MERGE

    def encode_images(self, pixel_values: torch.Tensor, **unused: Any) -> torch.Tensor:
        features = self.vision(
            pixel_values, self.cfg.vision_feature_layers, self.cfg.vision_feature_select_strategy
        )
        side = self.cfg.vision.grid_size
        merged = einops.reduce(
            features, "n (r i c j) d -> n (r c) d", "mean", r=side // MERGE, i=MERGE, j=MERGE
        )
        return self.projector(merged)


# --- the dry run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tmp_path_factory):
    try:
        AutoConfig.register("pooled_llava", PooledLlavaConfig)
    except ValueError:  # registered by an earlier run in this process
        pass
    folder = tmp_path_factory.mktemp("pooled") / "pooled-llava"
    shutil.copytree(tiny_checkpoint(), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "pooled_llava"}))
    yield mmlens.from_pretrained(folder)
    del MODEL_TYPES["pooled_llava"]


def test_the_family_loads_and_satisfies_the_contract(model):
    assert type(model) is HookedPooledLlava
    assert isinstance(HookedPooledLlava, VisionLanguageFamily)
    inp = model.prepare(make_test_image(56, 56), "What is it?")
    geometry = inp.image_geometry[0]
    assert isinstance(geometry, ImageTokenGeometry)
    merged = model.cfg.vision.grid_size // MERGE
    assert geometry.grid_size == (merged, merged) and len(inp.positions("image")) == merged**2


def test_its_image_embeddings_are_the_pooled_patches(model):
    inp = model.prepare(make_test_image(56, 56), "What is it?")
    _, cache = model.run_with_cache(inp, names_filter=["vision.hook_features", "hook_image_embeds"])
    features = cache["vision.hook_features"][0]  # [patches, d_vision], row-major
    side = model.cfg.vision.grid_size
    grid = features.reshape(side, side, -1)
    top_left = grid[:MERGE, :MERGE].mean((0, 1))
    expected = model.projector(top_left[None])[0]
    torch.testing.assert_close(cache["hook_image_embeds"][0, 0], expected, atol=1e-6, rtol=0)


def test_boxes_select_merged_cells(model):
    inp = model.prepare(make_test_image(56, 56), "What is it?")
    grid = inp.layout.patch_grid(0)
    cell = model.cfg.vision.patch_size * MERGE  # 28 pixels of a 56-pixel image: 2 x 2 cells
    assert inp.patches_in_box((0, 0, cell, cell)).tolist() == [int(grid[0, 0])]
    right_half = inp.patches_in_box((cell, 0, 2 * cell, 2 * cell)).tolist()
    assert right_half == sorted(grid[:, 1].tolist())


def test_the_analyses_run_through_the_contract(model):
    inp = model.prepare(make_test_image(56, 56), "What is it?", preset=CROSS_MODAL_FLOW)
    box = [(0, 0, 28, 28)]
    sweep = knockout_sweep(model, inp, boxes=[box], preset=CROSS_MODAL_FLOW, progress=False)
    assert {"Related patches→Question", "Image→Last"} <= set(sweep["flow"])
    assert sweep.attrs["window_size"] == 3  # the family's declared window for "pooled"
    cam = llava_cam(model, inp, "red", layers=[0, 1], noise_std=0, progress=False)
    assert cam.maps.shape == (2, MERGE, MERGE) and cam.highres_maps is None
    maps = last_row_attention_maps(model, inp)
    assert maps.shape == (model.cfg.n_layers, MERGE, MERGE)
    scores = box_scores(model, inp, box, maps)
    assert scores["area_share"] == 0.25
    assert CROSS_MODAL_FLOW.prepare_kwargs(model)["image_mode"] == "pad"
