"""Which mmlens class loads each Hugging Face `config.model_type`, filled by the model classes
themselves (`@register("llava")`), so that loading needs no list of models."""

from __future__ import annotations

from collections.abc import Callable

MODEL_TYPES: dict[str, type] = {}
"""HF `config.model_type` -> the mmlens class that loads it."""


def register(*model_types: str) -> Callable[[type], type]:
    """Class decorator: `cls` loads checkpoints of these HF model types.

    Examples:
        >>> from mmlens.models import HookedLlava
        >>> @register("my_llava")
        ... class MyLlava(HookedLlava): ...
        >>> model_class_for("my_llava").__name__
        'MyLlava'
        >>> del MODEL_TYPES["my_llava"]
    """

    def add(cls: type) -> type:
        for model_type in model_types:
            MODEL_TYPES[model_type] = cls
        return cls

    return add


def model_class_for(model_type: str) -> type:
    """The mmlens class for a HF `config.model_type`."""
    if model_type not in MODEL_TYPES:
        raise NotImplementedError(
            f"model_type {model_type!r} is not supported yet; supported: {sorted(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]
