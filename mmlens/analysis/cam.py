"""LLaVA-CAM: Grad-CAM maps of an answer over the image patches, for decoder and vision layers.

From Redundancy to Relevance (section 3.1, appendix A.1); semantics in docs/analyses.md. All requested layers come from one backward pass per noise sample.

Examples:
    >>> cam = llava_cam(model, inp, "red", layers=[0, 3, 5, "vision.blocks.2"], n_samples=2,
    ...                 progress=False)
    >>> cam.maps.shape          # [layer, rows, cols]: 8 x 8 patches here, 24 x 24 at 336 px
    torch.Size([4, 8, 8])
    >>> figure = mmlens.plot.llava_cam(cam, inp)      # figure.show() in a notebook
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.analysis.probability import answer_token_ids
from mmlens.inputs import input_settings

SITES = {
    "ln2": "ln2.hook_normalized",
    "ln1": "ln1.hook_normalized",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
}
"""Feature maps `llava_cam` can read in a block: "ln2" (the post-attention norm's output, the
paper's choice) and others, by the hook they read."""


@dataclass(frozen=True)
class CamResult:
    """Maps of `llava_cam`.

    Attributes:
        maps: ``[n_layers, rows, cols]`` on the vision tower's patch grid of the image's first
            crop (`vision_view`; a tiled image: the base crop's), each max-normalised to
            [0, 1] (all zero where the map is). Decoder maps have one value per image token:
            where a token is a patch, that patch's; where a connector merges patches into
            one token, repeated over its block (``settings["cells_per_token"]``, 2 x 2 for a
            2 x 2 merger); where image tokens are not patches, spread over them.
        layers: the layer of each map: "blocks.{l}" (decoder) or "vision.blocks.{l}".
        highres_maps: a tiled image only: ``[n_layers, rows, cols]`` on its tile token grid
            (`inp.layout.highres_grid`, the geometry's `tile_grid`), normalised the same way
            (where a connector merges patches, on the tiles' vision patches: a decoder map's
            token values repeated over their ``cells_per_token`` blocks, as in `maps`); None
            for an image that is not tiled.
        settings: model name, answer and its ids, site, noise_std, n_samples, relu_gradients,
            how decoder maps reached the patches where image tokens are not patches
            (``"spread"``, the family's `spread_note`),
            the input's settings (`inputs`), ``cells_per_token`` where a token covers several
            patches,
            threshold, seed, image index, and the processor's image_mean / image_std (to draw
            the image as the model saw it).
    """

    maps: Float[Tensor, "layer rows cols"]
    layers: list[str]
    settings: dict[str, Any]
    highres_maps: Float[Tensor, "layer high_rows high_cols"] | None = None
    image_pixels: Float[Tensor, "channel height width"] | None = None
    """The first crop as the vision tower saw it (normalised, the family's `vision_pixels`):
    what `mmlens.plot.llava_cam` draws under the maps."""

    def on_image(self, highres: bool = True) -> Float[Tensor, "layer height width"]:
        """The maps stretched over the original image, ``[layer, height, width]``, for a tiled
        image (both of its grids cover the whole image; the high-resolution one by default).

        Examples:
            >>> cam = llava_cam(next_model, next_model.prepare(image, "Why?"), "red",
            ...                 layers=[0, "vision.blocks.0"], noise_std=0, progress=False)
            >>> cam.maps.shape, cam.highres_maps.shape, cam.on_image().shape
            (torch.Size([2, 4, 4]), torch.Size([2, 8, 8]), torch.Size([2, 112, 112]))
        """
        if "original_size" not in self.settings:
            raise ValueError(
                "on_image stretches a tiled image's maps, which cover the whole image; a "
                "single crop's map covers the processed image (pad, crop): draw it with "
                "mmlens.plot.llava_cam"
            )
        maps = self.highres_maps if highres else self.maps
        size = tuple(self.settings["original_size"])
        return F.interpolate(maps[:, None], size=size, mode="nearest")[:, 0]


def llava_cam(
    model: Any,
    inp: Any,
    answer: str | Sequence[int],
    layers: Sequence[int | str] | None = None,
    site: str = "ln2",
    noise_std: float = 0.1,
    n_samples: int = 16,
    relu_gradients: bool = False,
    threshold: float | None = None,
    seed: int = 0,
    image: int = 0,
    progress: bool = True,
) -> CamResult:
    """Grad-CAM of the answer's logits over the image patches, at every requested layer.

    The answer is teacher-forced after the prompt (`answer_token_ids`: tokenised as the model
    would generate it) and the target is the sum of the logits of its tokens at the positions that
    predict them. Per layer, the feature map A is the block's `site` activation (default the
    post-attention norm's output, ``ln2.hook_normalized``) at the image's patches: for decoder
    layers (ints) at the image tokens' positions, for vision-tower layers ("vision.blocks.{l}")
    at the patch tokens (CLS excluded; in the grid order the family's `vision_patch_index`
    gives, e.g. patches a processor groups by merge window put back in rows). Then
    ``alpha_c = mean over patches of d target / d A_c``, ``map = ReLU(sum_c alpha_c A_c)``
    on the grid (a decoder layer's: its image tokens'), max-normalised.

    SmoothGrad: each of `n_samples` runs adds Gaussian noise of std `noise_std` to the [0, 1]
    image the vision tower sees (after pad, resize and crop; implemented as
    ``pixel_values + noise / image_std[channel]``, no clipping, by the family's `pixel_noise`,
    which knows the layout of ``pixel_values``: rows of flattened patches get one draw per
    pixel, the same on a still image's repeated frames); the raw maps are averaged, then
    normalised. ``noise_std=0`` makes one noiseless run. Each run is one forward and ONE
    backward pass (`torch.autograd.grad` on all layers' activations at once).

    Args:
        answer: the answer text, or its token ids.
        layers: ints (decoder) and "vision.blocks.{l}" strings; default every decoder layer.
        site: a key of `SITES` (default "ln2", as in the paper's appendix A.1).
        relu_gradients: ReLU the gradients before averaging them (the authors' script).
        threshold: after normalising, set map values below it to 0 (the script used 0.5).
        seed: seed of the noise.
        image: which image of the (single-item) input to map.
        progress: show a progress bar over the samples.

    Raises:
        ValueError: a batch of more than one item; a layer or site that does not exist; a vision
            layer the model does not run (blocks after the last `vision_feature_layer`).

    Examples:
        >>> cam = llava_cam(model, inp, "red", layers=range(model.cfg.n_layers), noise_std=0,
        ...                 progress=False)
        >>> cam.maps[3].shape, cam.maps[3].max().item()             # [rows, cols], max 1
        (torch.Size([8, 8]), 1.0)
    """
    if inp.batch_size != 1:
        raise ValueError(f"llava_cam takes a single prompt; this input has {inp.batch_size}")
    if inp.pixel_values is None:
        raise ValueError("llava_cam needs an input with an image")
    if site not in SITES:
        raise ValueError(f"site={site!r}: use one of {', '.join(SITES)}")
    layer_names = _layer_names(model, layers)
    hook_names = model.hook_names([f"{layer}.{SITES[site]}" for layer in layer_names])
    ids = (
        answer_token_ids(model, inp, answer)
        if isinstance(answer, str)
        else [int(i) for i in answer]
    )
    grids = _grids(model, inp, image)
    image_std = torch.tensor(model.processor.image_processor.image_std)
    image_mean = torch.tensor(model.processor.image_processor.image_mean)

    run = inp.with_tokens(ids).model_kwargs()
    predicting = torch.arange(len(ids), device=inp.device) + inp.input_ids.shape[1] - 1
    generator = torch.Generator(device=inp.pixel_values.device).manual_seed(seed)
    n_runs = n_samples if noise_std > 0 else 1

    totals = None
    for _ in tqdm(range(n_runs), desc="LLaVA-CAM", disable=not progress):
        noise = model.pixel_noise(inp.pixel_values, noise_std, generator)
        run["pixel_values"] = inp.pixel_values + noise
        raw = _raw_maps(
            model, run, hook_names, torch.tensor(ids, device=inp.device), predicting, grids,
            relu_gradients,
        )  # fmt: skip
        if totals is None:
            totals = raw
        else:
            totals = [None if t is None else t + r for t, r in zip(totals, raw, strict=True)]
    maps, highres = (None if t is None else _normalised(t / n_runs, threshold) for t in totals)
    settings = {
        "analysis": "llava_cam",
        "model": model.cfg.model_name,
        "answer": answer if isinstance(answer, str) else model.to_string(ids),
        "answer_ids": ids,
        "site": site,
        "noise_std": noise_std,
        "n_samples": n_runs,
        "relu_gradients": relu_gradients,
        "threshold": threshold,
        "seed": seed,
        "image": image,
        "image_mean": image_mean.tolist(),
        "image_std": image_std.tolist(),
        "inputs": input_settings(inp),
    }
    if grids.highres is not None:
        settings["original_size"] = list(inp.image_geometry[image].original_size)
    if grids.tokens is not None:
        settings["spread"] = model.spread_note
    if grids.cells_per_token != (1, 1):
        settings["cells_per_token"] = list(grids.cells_per_token)
    return CamResult(
        maps=maps,
        layers=layer_names,
        settings=settings,
        highres_maps=highres,
        image_pixels=model.vision_pixels(inp, image).detach().cpu(),
    )


@dataclass(frozen=True)
class _Grids:
    """Where an image's patches are: the sequence positions of its base grid (and of a tiled
    image's tile token grid) for decoder hooks; for vision hooks, its first crop, whether crops
    start with a class token, and its geometry (whose `tile_grid` packs the tile crops). Where
    image tokens are not patches, `base` numbers the vision grid's patches and `tokens` holds
    the image tokens' positions."""

    base: Int[Tensor, "rows cols"]
    highres: Int[Tensor, "high_rows high_cols"] | None
    first_crop: int
    has_cls: bool
    geometry: Any
    vision_row: int
    vision: Int[Tensor, "vision_rows vision_cols"]
    tokens: Int[Tensor, "token"] | None = None

    @property
    def cells_per_token(self) -> tuple[int, int]:
        """The vision tower's patches per image token along rows and columns (2 x 2 where a
        connector merges patches; 1 x 1 where each token is a patch)."""
        return (
            self.vision.shape[0] // self.base.shape[0],
            self.vision.shape[1] // self.base.shape[1],
        )


def _grids(model: Any, inp: Any, image: int) -> _Grids:
    geometries = inp.image_geometry
    geometry = geometries[image]
    first_crop = sum(other.n_crops for other in geometries[:image])
    has_cls = model.cfg.vision.has_cls
    vision_row, vision = model.vision_patch_index(inp, image)
    if not model.image_tokens_are_patches:  # maps on the vision grid, through the tokens
        rows, cols = vision.shape
        tokens = inp.layout.position[inp.layout.image == image]
        vision_grid = torch.arange(rows * cols).reshape(rows, cols)
        return _Grids(vision_grid, None, first_crop, has_cls, geometry, vision_row, vision, tokens)
    base = inp.layout.patch_grid(image)
    if vision.shape[0] % base.shape[0] or vision.shape[1] % base.shape[1]:
        raise ValueError(
            f"image {image}'s vision grid {tuple(vision.shape)} is not a whole number of "
            f"cells per image token of its token grid {tuple(base.shape)}"
        )
    highres = inp.layout.highres_grid(image) if geometry.tile_grid is not None else None
    return _Grids(base, highres, first_crop, has_cls, geometry, vision_row, vision)


def _normalised(maps: Tensor, threshold: float | None) -> Tensor:
    maps = maps / maps.amax((1, 2), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    return maps if threshold is None else maps.where(maps >= threshold, 0.0)


def _layer_names(model: Any, layers: Sequence[int | str] | None) -> list[str]:
    """Names "blocks.{l}" for decoder layers (ints); vision layers as given."""
    if layers is None:
        layers = range(model.cfg.n_layers)
    names = []
    for layer in layers:
        if isinstance(layer, str):
            if not layer.startswith("vision.blocks."):
                raise ValueError(
                    f"layer {layer!r}: give decoder layers as ints, vision layers as "
                    "'vision.blocks.{l}'"
                )
            names.append(layer)
        else:
            names.append(f"blocks.{int(layer)}")
    return names


def _raw_maps(
    model: Any,
    run: dict[str, Tensor],
    hook_names: list[str],
    answer: Int[Tensor, "answer"],
    predicting: Int[Tensor, "answer"],
    grids: _Grids,
    relu_gradients: bool,
) -> list[Float[Tensor, "layer rows cols"] | None]:
    """One forward and one backward pass: the un-normalised maps of every hooked layer, on the
    base grid and (a tiled image) on its tile token grid. Where image tokens are not patches,
    decoder layers give a Grad-CAM relevance per image token, spread over the patches by the
    family's `tokens_to_patches` from the same pass."""
    captured: dict[str, Tensor] = {}

    def capture(activation: Tensor, hook: Any) -> None:
        captured[hook.name] = activation

    hooks = [(name, capture) for name in hook_names]
    if grids.tokens is not None:
        hooks += [(name, capture) for name in model.spread_hook_names()]
    with torch.enable_grad():
        # Pixels that require grad give the activations a graph even if the weights do not.
        run = dict(run, pixel_values=run["pixel_values"].detach().requires_grad_())
        logits = model.run_with_hooks(**run, fwd_hooks=hooks)
        target = logits[0, predicting, answer].float().sum()
        for name in hook_names:
            if name not in captured:
                raise ValueError(
                    f"{name} did not run: the vision tower stops after the last layer the "
                    f"projector uses (vision_feature_layer={model.cfg.vision_feature_layer})"
                )
        gradients = torch.autograd.grad(target, [captured[name] for name in hook_names])

    # How the image tokens read the patches, once for every decoder layer's map.
    spread = model.tokens_to_patches(captured) if grids.tokens is not None else None
    results = []
    for highres in (False, True):
        grid = grids.highres if highres else grids.vision
        if grid is None:
            results.append(None)
            continue
        maps = []
        for name, gradient in zip(hook_names, gradients, strict=True):
            if spread is not None and not name.startswith("vision."):
                maps.append(_token_map(captured[name], gradient, grids, spread, relu_gradients))
                continue
            features, gradient = (
                _patch_features(tensor, name, grids, highres)
                for tensor in (captured[name], gradient)
            )
            if relu_gradients:
                gradient = F.relu(gradient)
            weights = gradient.mean(0)  # alpha: [channel], over this grid's patches
            rows, cols = grids.cells_per_token
            if name.startswith("vision."):  # on the vision tower's patches
                shape = grid.shape if not highres else (grid.shape[0] * rows, grid.shape[1] * cols)
                maps.append(F.relu(features @ weights).reshape(shape))
                continue
            # A decoder map: one value per image token, shown on the vision grid's patches
            # (each token's cells_per_token block; 1 x 1 where tokens are patches).
            token_map = F.relu(features @ weights).reshape(
                (grids.highres if highres else grids.base).shape
            )
            maps.append(token_map.repeat_interleave(rows, 0).repeat_interleave(cols, 1))
        results.append(torch.stack(maps).cpu())
    return results


def _token_map(
    activation: Float[Tensor, "batch pos d"],
    gradient: Float[Tensor, "batch pos d"],
    grids: _Grids,
    spread: Float[Tensor, "token patch"],
    relu_gradients: bool,
) -> Float[Tensor, "rows cols"]:
    """A decoder layer where image tokens are not patches: Grad-CAM over the image tokens
    (their relevance ``ReLU(A_t . alpha)``), times how each token reads the patches (`spread`)."""
    features = activation[0, grids.tokens].detach().float()
    gradient = gradient[0, grids.tokens].float()
    if relu_gradients:
        gradient = F.relu(gradient)
    relevance = F.relu(features @ gradient.mean(0))
    return (relevance @ spread.to(relevance.device)).reshape(grids.base.shape)


def _patch_features(
    activation: Float[Tensor, "batch pos d"], name: str, grids: _Grids, highres: bool
) -> Float[Tensor, "patch d"]:
    """The activation at the image's patches, in the grid's row-major order.

    Decoder hooks hold the sequence (the grid gives the positions). Vision hooks hold one row
    per crop (a class token first where the tower has one), then the patches row-major: the
    first crop's are the base grid; a tiled image's tile crops are packed into its token grid
    by its geometry's `tile_grid.pack`, as the model packs its projected features
    (docs/analyses.md).
    """
    activation = activation.detach().float()
    if not name.startswith("vision."):
        grid = grids.highres if highres else grids.base
        return activation[0, grid.flatten().to(activation.device)]
    if not highres:  # the first crop, by the family's `vision_patch_index`
        return activation[grids.vision_row, grids.vision.flatten().to(activation.device)]
    first_patch = int(grids.has_cls)
    tile_grid = grids.geometry.tile_grid
    first_tile = grids.first_crop + tile_grid.first_tile_crop
    tiles = activation[first_tile : first_tile + tile_grid.n_tiles, first_patch:]
    packed = tile_grid.pack(tiles)
    return packed.reshape(-1, packed.shape[-1])
