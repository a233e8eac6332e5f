"""mmlens: TransformerLens-style interpretability for LLaVA-family vision-language models.

The subpackages are the rooms of the house (docs/architecture.md): `models` (decoder, vision
tower, projector, LLaVA, LLaVA-NeXT), `inputs` (`MultimodalInput` and what it is made of),
`ablations` (hook lists), `analysis` (the papers' measurements), `presets` (the papers'
settings), `data` and `metrics` (data sets and benchmark scores), `experiments` (`run`: an
experiment over a data set) and `results`, `plot`, `report`, `sae` (sparse autoencoders and
transcoders), `zoo` (the shipped organisms).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# Names are imported on first use (PEP 562), so that `mmlens --help` and `mmlens --version` answer
# without importing torch and transformers (docs/experiments.md, "The command line").
_SUBMODULES = {
    "ablations", "analysis", "data", "inputs", "metrics", "models", "patching", "plot",
    "presets", "report", "results", "sae", "zoo",
}  # fmt: skip
_NAMES = {
    "MMConfig": "mmlens.config",
    "VisionConfig": "mmlens.config",
    "run": "mmlens.experiments",
    "MultimodalInput": "mmlens.inputs",
    "HookedGemma3": "mmlens.models",
    "HookedInstructBlip": "mmlens.models",
    "HookedInternVL": "mmlens.models",
    "HookedLlava": "mmlens.models",
    "HookedLlavaNext": "mmlens.models",
    "HookedLlavaOnevision": "mmlens.models",
    "HookedQwen2VL": "mmlens.models",
    "HookedQwen3VL": "mmlens.models",
    "HookedQwen25VL": "mmlens.models",
    "HookedQwenVL": "mmlens.models",
    "HookedTransformer": "mmlens.models",
    "from_pretrained": "mmlens.models",
    "KVCache": "mmlens.sequence",
    "PrefixState": "mmlens.sequence",
    "SequenceState": "mmlens.sequence",
    "load": "mmlens.zoo",
}

if TYPE_CHECKING:
    from mmlens import (
        ablations,
        analysis,
        data,
        inputs,
        metrics,
        models,
        patching,
        plot,
        presets,
        report,
        results,
        sae,
        zoo,
    )
    from mmlens.config import MMConfig, VisionConfig
    from mmlens.experiments import run
    from mmlens.inputs import MultimodalInput
    from mmlens.models import (
        HookedGemma3,
        HookedInstructBlip,
        HookedInternVL,
        HookedLlava,
        HookedLlavaNext,
        HookedLlavaOnevision,
        HookedQwen2VL,
        HookedQwen3VL,
        HookedQwen25VL,
        HookedQwenVL,
        HookedTransformer,
        from_pretrained,
    )
    from mmlens.sequence import KVCache, PrefixState, SequenceState
    from mmlens.zoo import load


def __getattr__(name: str) -> Any:
    """Import a subpackage or a top-level name on first access (then cached in the module)."""
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
    elif name in _SUBMODULES or importlib.util.find_spec(f"mmlens.{name}") is not None:
        # Any subpackage, as when they were all imported eagerly (`mmlens.experiments`).
        value = importlib.import_module(f"mmlens.{name}")
    else:
        raise AttributeError(f"module 'mmlens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "HookedInstructBlip",
    "HookedInternVL",
    "HookedLlava",
    "HookedLlavaNext",
    "HookedLlavaOnevision",
    "HookedQwen25VL",
    "HookedQwen2VL",
    "HookedGemma3",
    "HookedQwen3VL",
    "HookedQwenVL",
    "HookedTransformer",
    "KVCache",
    "MMConfig",
    "MultimodalInput",
    "PrefixState",
    "SequenceState",
    "VisionConfig",
    "ablations",
    "analysis",
    "data",
    "from_pretrained",
    "inputs",
    "load",
    "metrics",
    "models",
    "patching",
    "plot",
    "presets",
    "report",
    "results",
    "run",
    "sae",
    "zoo",
]
__version__ = "0.1.0"
