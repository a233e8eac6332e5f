"""Grounding: how much of a map over the image (LLaVA-CAM, attention) lies on the ground-truth
boxes of the objects a question is about, and the attention maps it is measured on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float

from mmlens.inputs import Box


def box_scores(
    model: Any,
    inp: Any,
    boxes: Sequence[Box],
    maps: torch.Tensor,
    image: int = 0,
) -> dict:
    """How much of each map's mass lies on the patches of `boxes`, against their area share.

    `maps`: `[layer, rows, cols]` on the patch grid of image `image` of `inp` (LLaVA-CAM maps or
    attention to the image reshaped to the grid; InstructBLIP: the vision tower's patch grid).
    Returns per-layer mass share, the area share, and whether each layer's maximum (the
    pointing game) falls inside the boxes.
    """
    vision = getattr(inp.image_geometry[image], "vision", None)
    if vision is not None:  # InstructBLIP: the maps are on the vision tower's patch grid
        in_box = torch.zeros(vision.grid_size, dtype=torch.bool)
        for box in boxes:
            rows, cols = vision.patch_ranges(box)
            in_box[rows.start : rows.stop, cols.start : cols.stop] = True
    else:
        grid = inp.layout.patch_grid(image)
        box_positions = torch.cat([inp.patches_in_box(box, image=image) for box in boxes])
        in_box = torch.isin(grid, box_positions.to(grid.device)).cpu()
    maps = maps.float().cpu()
    total = maps.flatten(1).sum(1).clamp(min=1e-12)
    mass = (maps * in_box).flatten(1).sum(1) / total
    hits = in_box.flatten()[maps.flatten(1).argmax(1)]
    return {"mass_in_box": mass, "area_share": in_box.float().mean().item(), "pointing_hit": hits}


def queries_to_patches(
    model: Any, patterns: dict[str, torch.Tensor], image: int = 0
) -> Float[torch.Tensor, "query patch"]:
    """How InstructBLIP's queries read the patches of image `image`: the Q-Former's
    cross-attention patterns (`qformer.blocks.{l}.cross_attn.hook_pattern` in `patterns`), mean
    over heads and cross-attention blocks, the class token's column dropped; each query's row
    sums to its attention on patches (below 1 by what it gave the class token). A map over the
    queries times this matrix is a map over the patches (row-major on the vision grid).

    Examples:
        >>> blip_inp = blip_model.prepare(image, "What colour is the star?")
        >>> _, cache = blip_model.run_with_cache(blip_inp)
        >>> queries_to_patches(blip_model, cache).shape     # 8 queries, 4 x 4 patches
        torch.Size([8, 16])
    """
    names = [name for name in model.hook_dict if name.endswith("cross_attn.hook_pattern")]
    stacked = torch.stack([patterns[name][image].detach().float() for name in names])
    return stacked.mean((0, 1))[:, int(model.cfg.vision.has_cls) :].cpu()


def last_row_attention_maps(model: Any, inp: Any) -> Float[torch.Tensor, "layer rows cols"]:
    """The last position's attention to each image patch, mean over heads, on the patch grid
    (batch-1 input). InstructBLIP: the attention to each query token, taken to the patches by
    the queries' cross-attention (`queries_to_patches`), on the vision tower's grid.

    Examples:
        >>> maps = last_row_attention_maps(model, inp)        # [layer, rows, cols]
        >>> maps.shape
        torch.Size([6, 8, 8])
        >>> box_scores(model, inp, sample.boxes, maps)["pointing_hit"]   # the star's box
        tensor([False,  True,  True, False, False, False])
    """
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    spread_names = (
        []
        if model.image_tokens_are_patches
        else [name for name in model.hook_dict if name.endswith("cross_attn.hook_pattern")]
    )
    with torch.no_grad():
        _, cache = model.run_with_cache(inp, names_filter=names + spread_names)
    rows = torch.stack([cache[name][0, :, -1].mean(0) for name in names])  # [layer, k_pos]
    if model.image_tokens_are_patches:
        grid = inp.layout.patch_grid(0)
        return rows[:, grid.flatten()].reshape(len(names), *grid.shape)
    queries = rows[:, inp.positions("image")].float().cpu()
    grid_size = inp.image_geometry[0].vision.grid_size
    return (queries @ queries_to_patches(model, cache)).reshape(len(names), *grid_size)
