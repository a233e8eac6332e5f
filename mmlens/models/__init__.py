from mmlens.models.llava import HookedLlava
from mmlens.models.llava_next import HookedLlavaNext

__all__ = ["HookedLlava", "HookedLlavaNext"]
