"""mmlens: TransformerLens-style interpretability for LLaVA-family vision-language models."""

from mmlens.config import MMConfig, VisionConfig
from mmlens.hooked_transformer import HookedTransformer
from mmlens.loading import from_pretrained
from mmlens.models import HookedLlava, HookedLlavaNext
from mmlens.sequence import KVCache, PrefixState, SequenceState
from mmlens.zoo import load

__all__ = [
    "HookedLlava",
    "HookedLlavaNext",
    "HookedTransformer",
    "KVCache",
    "MMConfig",
    "PrefixState",
    "SequenceState",
    "VisionConfig",
    "from_pretrained",
    "load",
]
__version__ = "0.1.0"
