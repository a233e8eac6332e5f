from mmlens.models.llava import HookedLlava

__all__ = ["HookedLlava"]
