"""Every model mmlens builds: the decoder (`HookedTransformer`), the vision tower, the projector,
LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, InstructBLIP, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, the original Qwen-VL,
Gemma 3 and InternVL. Each class registers the HF `config.model_type`s it loads
(`mmlens.models.registry`), so `from_pretrained` dispatches without a list of models."""

from __future__ import annotations

import os

import torch

from mmlens.models import original  # noqa: F401  (registers the original LLaVA release format)
from mmlens.models.decoder import HookedTransformer
from mmlens.models.gemma3 import HookedGemma3
from mmlens.models.instructblip import HookedInstructBlip
from mmlens.models.internvl import HookedInternVL
from mmlens.models.llava import HookedLlava
from mmlens.models.llava_next import HookedLlavaNext
from mmlens.models.llava_onevision import HookedLlavaOnevision
from mmlens.models.qwen2_5_vl import HookedQwen25VL
from mmlens.models.qwen2_vl import HookedQwen2VL
from mmlens.models.qwen3_vl import HookedQwen3VL
from mmlens.models.qwen_vl import HookedQwenVL
from mmlens.models.registry import MODEL_TYPES, model_class_for, register


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
) -> HookedLlava | HookedTransformer:
    """Load any supported checkpoint as the class registered for its `config.model_type`.

    Args:
        path_or_id: a local folder written by `save_pretrained` (llava-hf layout), or a hub id
            that is already in the local Hugging Face cache.
        dtype: torch.float32, torch.bfloat16 or torch.float16, or its name ("bfloat16").
        device: where the weights go.
        device_map: "auto" or module name -> device, for a model on several devices
            (`mmlens.models.placement`).

    Examples:
        >>> half = mmlens.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"), dtype="bfloat16")
        >>> half.cfg.dtype, type(half).__name__
        (torch.bfloat16, 'HookedLlava')

        A hub id (``"llava-hf/llava-1.5-7b-hf"``) loads from the local Hugging Face cache.
    """
    return HookedTransformer.from_pretrained(
        path_or_id, dtype=dtype, device=device, device_map=device_map
    )


__all__ = [
    "MODEL_TYPES",
    "HookedGemma3",
    "HookedInstructBlip",
    "HookedInternVL",
    "HookedLlava",
    "HookedLlavaNext",
    "HookedLlavaOnevision",
    "HookedQwen25VL",
    "HookedQwen2VL",
    "HookedQwen3VL",
    "HookedQwenVL",
    "HookedTransformer",
    "from_pretrained",
    "model_class_for",
    "register",
]
