"""LLaVA-CAM: Grad-CAM maps of an answer over the image patches, for decoder and vision layers.

From Redundancy to Relevance (section 3.1, appendix A.1); semantics in docs/analyses.md. All requested layers come from one backward pass per noise sample.

Examples:
    >>> cam = llava_cam(model, inp, "red", layers=[0, 3, 5, "vision.blocks.2"], n_samples=2,
    ...                 progress=False)
    >>> cam.maps.shape          # [layer, rows, cols]: 8 x 8 patches here, 24 x 24 for llava-1.5
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
        maps: ``[n_layers, rows, cols]`` on the image's patch grid, each max-normalised to [0, 1]
            (all zero where the map is).
        layers: the layer of each map: "blocks.{l}" (decoder) or "vision.blocks.{l}".
        settings: model name, answer and its ids, site, noise_std, n_samples, relu_gradients,
            the input's settings (`inputs`),
            threshold, seed, image index, and the processor's image_mean / image_std (to draw
            the image as the model saw it).
    """

    maps: Float[Tensor, "layer rows cols"]
    layers: list[str]
    settings: dict[str, Any]


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
    at the patch tokens (CLS excluded). Then ``alpha_c = mean over patches of d target / d A_c``,
    ``map = ReLU(sum_c alpha_c A_c)`` on the patch grid, max-normalised.

    SmoothGrad: each of `n_samples` runs adds Gaussian noise of std `noise_std` to the [0, 1]
    image the vision tower sees (after pad, resize and crop; implemented as
    ``pixel_values + noise / image_std[channel]``, no clipping); the raw maps are averaged, then
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
    if inp.pixel_values is None or inp.pixel_values.ndim != 4:
        raise ValueError(
            "llava_cam needs LLaVA-1.5-style pixel_values [n_images, channel, height, width]"
        )
    if site not in SITES:
        raise ValueError(f"site={site!r}: use one of {', '.join(SITES)}")
    layer_names = _layer_names(model, layers)
    hook_names = model.hook_names([f"{layer}.{SITES[site]}" for layer in layer_names])
    ids = (
        answer_token_ids(model, inp, answer)
        if isinstance(answer, str)
        else [int(i) for i in answer]
    )
    grid = inp.layout.patch_grid(image)
    image_std = torch.tensor(model.processor.image_processor.image_std)
    image_mean = torch.tensor(model.processor.image_processor.image_mean)

    run = inp.with_tokens(ids).model_kwargs()
    predicting = torch.arange(len(ids), device=inp.device) + inp.input_ids.shape[1] - 1
    noise_scale = noise_std / image_std.to(inp.pixel_values)[:, None, None]
    generator = torch.Generator(device=inp.pixel_values.device).manual_seed(seed)
    n_runs = n_samples if noise_std > 0 else 1

    total = torch.zeros(len(layer_names), *grid.shape)
    for _ in tqdm(range(n_runs), desc="LLaVA-CAM", disable=not progress):
        noise = torch.randn(inp.pixel_values.shape, generator=generator, device=inp.device)
        run["pixel_values"] = inp.pixel_values + noise.to(inp.pixel_values) * noise_scale
        total += _raw_maps(
            model,
            run,
            hook_names,
            torch.tensor(ids, device=inp.device),
            predicting,
            grid,
            image,
            relu_gradients,
        )
    maps = total / n_runs
    maps = maps / maps.amax((1, 2), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    if threshold is not None:
        maps = maps.where(maps >= threshold, 0.0)
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
    return CamResult(maps=maps, layers=layer_names, settings=settings)


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
    grid: Int[Tensor, "rows cols"],
    image: int,
    relu_gradients: bool,
) -> Float[Tensor, "layer rows cols"]:
    """One forward and one backward pass: the un-normalised map of every hooked layer."""
    captured: dict[str, Tensor] = {}

    def capture(activation: Tensor, hook: Any) -> None:
        captured[hook.name] = activation

    with torch.enable_grad():
        # Pixels that require grad give the activations a graph even if the weights do not.
        run = dict(run, pixel_values=run["pixel_values"].detach().requires_grad_())
        logits = model.run_with_hooks(**run, fwd_hooks=[(name, capture) for name in hook_names])
        target = logits[0, predicting, answer].float().sum()
        for name in hook_names:
            if name not in captured:
                raise ValueError(
                    f"{name} did not run: the vision tower stops after the last layer the "
                    f"projector uses (vision_feature_layer={model.cfg.vision_feature_layer})"
                )
        gradients = torch.autograd.grad(target, [captured[name] for name in hook_names])

    maps = []
    for name, gradient in zip(hook_names, gradients, strict=True):
        features, gradient = (
            _patch_features(tensor, name, grid, image) for tensor in (captured[name], gradient)
        )
        if relu_gradients:
            gradient = F.relu(gradient)
        weights = gradient.mean(0)  # alpha: [channel]
        maps.append(F.relu(features @ weights).reshape(grid.shape))
    return torch.stack(maps).cpu()


def _patch_features(
    activation: Float[Tensor, "batch pos d"], name: str, grid: Int[Tensor, "rows cols"], image: int
) -> Float[Tensor, "patch d"]:
    """The activation at the image's patches, in the grid's row-major order.

    Decoder hooks hold the sequence (`grid` gives the positions); vision hooks hold one row per
    image with CLS first and the patches in row-major order.
    """
    activation = activation.detach().float()
    if name.startswith("vision."):
        return activation[image, 1:]
    return activation[0, grid.flatten().to(activation.device)]
