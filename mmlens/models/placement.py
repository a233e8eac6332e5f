"""Models larger than one device: whole modules placed on several devices (accelerate's big-model
conventions), the residual stream moved at block boundaries (docs/checkpoints.md, "Several
devices").

A device map names mmlens modules (``"embed"``, ``"vision"``, ``"projector"`` or
InstructBLIP's ``"qformer"`` and ``"language_projection"``, ``"image_newline"``,
``"blocks.{l}"``, ``"ln_final"``, ``"unembed"``; a prefix such as ``"blocks"`` covers all of
them) and gives each a device. ``"auto"`` asks accelerate's
`infer_auto_device_map` to fill the GPUs in order without splitting a block. The decoder moves
its rows (residual stream, positions, masks) to each block's device before running it, so every
hook sees tensors on its own block's device; keys and values of a block stay on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def place(model: nn.Module, device_map: str | Mapping[str, Any]) -> dict[str, str]:
    """Move `model`'s modules to the devices of `device_map` (see the module doc); return the
    map, one entry per top-level module and block, as placed.

    Raises:
        ValueError: a name that is no module of the model, a module left without a device, or
            an unknown string map.

    Examples:
        On two GPUs: ``{"embed": "cuda:0", "vision": "cuda:0", "projector": "cuda:0", "blocks.0":
        "cuda:0", "blocks.1": "cuda:1", "ln_final": "cuda:1", "unembed": "cuda:1"}``. Here, the
        same call with CPU devices:

        >>> spread = mmlens.load("tiny-shapes")
        >>> first = {"embed": "cpu", "vision": "cpu", "projector": "cpu", "ln_final": "cpu",
        ...          "unembed": "cpu", **{f"blocks.{l}": "cpu" for l in range(6)}}
        >>> placed = place(spread, first)                    # returns the map it applied
        >>> sorted(set(placed.values()))
        ['cpu']
        >>> torch.equal(spread(inp), model(inp))
        True
    """
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ValueError(f"device_map={device_map!r}: use 'auto' or a dict name -> device")
        device_map = _auto(model)
    units = _units(model)
    placed: dict[str, str] = {}
    for unit in units:
        matches = [name for name in device_map if _covers(name, unit)]
        if not matches:
            raise ValueError(
                f"device_map gives no device for {unit!r}; name every module (or a prefix such "
                f"as 'blocks'): {', '.join(units)}"
            )
        placed[unit] = str(torch.device(device_map[max(matches, key=len)]))
    unknown = [name for name in device_map if not any(_covers(name, unit) for unit in units)]
    if unknown:
        raise ValueError(f"device_map names {unknown}, which are not modules of this model")
    for unit, device in placed.items():
        if isinstance(getattr(model, unit, None), nn.Parameter):  # LLaVA-NeXT's image_newline
            getattr(model, unit).data = getattr(model, unit).data.to(device)
        else:
            model.get_submodule(unit).to(device)
    model.device_map = placed
    return placed


def _covers(name: str, unit: str) -> bool:
    """Whether device-map entry `name` covers `unit` ("" covers everything, as accelerate's
    map of a model that fits one device)."""
    return name in ("", unit) or unit.startswith(name + ".")


def _units(model: nn.Module) -> list[str]:
    """The placeable units: every top-level module (the blocks one by one) and top-level
    parameters (LLaVA-NeXT's `image_newline`)."""
    units = []
    for name, child in model.named_children():
        if name == "blocks":
            units += [f"blocks.{index}" for index in range(len(child))]
        elif any(True for _ in child.parameters()):
            units.append(name)
    units += [name for name, _ in model.named_parameters(recurse=False)]
    return units


def _auto(model: nn.Module) -> dict[str, Any]:
    """accelerate's map over the available devices, blocks never split."""
    from accelerate import infer_auto_device_map

    whole = [
        model.blocks[0],
        *(
            getattr(model, name)
            for name in ("vision", "projector", "qformer")
            if hasattr(model, name)
        ),
    ]
    return infer_auto_device_map(
        model, no_split_module_classes=sorted({type(module).__name__ for module in whole})
    )
