"""mmlens: TransformerLens-style interpretability for LLaVA-family vision-language models.

The subpackages are the rooms of the house (docs/architecture.md): `models` (decoder, vision
tower, projector, LLaVA, LLaVA-NeXT), `inputs` (`MultimodalInput` and what it is made of),
`ablations` (hook lists), `analysis` (the papers' measurements), `presets` (the papers'
settings), `data` and `metrics` (data sets and benchmark scores), `experiments` (`run`: an
experiment over a data set) and `results`, `plot`, `report`, `sae` (sparse autoencoders and
transcoders), `zoo` (the shipped organisms).
"""

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
