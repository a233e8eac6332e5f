"""Processor adapters: how `MultimodalInput.from_processor` reads a kind of processor, so that
the inputs never name a model family (docs/architecture.md, "The family contract").

An adapter says which of `prepare`'s image options apply to the processor, how to make the
processor's variant for them, and the geometry of each image (`ImageTokenGeometry`). The
single-crop adapter (`SINGLE_CROP`: LLaVA-1.5's HF processor, pad / crop / squash) is the
default; a family whose processor tiles images or places its image tokens itself registers its
own in its module (`register_adapter`), and a later registration wins over an earlier one, so a
family built on another one's processor can refine it.

Examples:
    >>> processor_adapter(model.processor).name
    'single-crop'
    >>> processor_adapter(next_model.processor).options
    ('anyres',)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mmlens.inputs.geometry import ImageGeometry, with_image_mode


def _same(processor: Any, option: Any) -> Any:
    return processor


@dataclass(frozen=True)
class ProcessorAdapter:
    """How the inputs read one kind of processor.

    Attributes:
        name: in error messages ("single-crop", "tiles", ...).
        matches: whether a processor is of this kind.
        geometry: ``(processor, original_size, alone_in_prompt, patch_size, anyres)`` -> the
            image's geometry; `processor` is the one `with_image_mode` made, `alone_in_prompt`
            whether the image is its prompt's only one.
        options: which of ``"image_mode"`` and ``"anyres"`` apply (others must stay at their
            defaults, None and "hf").
        with_image_mode: ``(processor, image_mode)`` -> its variant for that geometry.
        with_anyres: ``(processor, anyres)`` -> its variant for that tiling rule.
        places_image_tokens: the processor writes its image tokens itself and gives each token
            its character span (``processor.token_spans(texts, input_ids, attention_mask)``):
            only ``tokenization="hf"`` applies.
        fingerprint_parts: ``processor`` -> settings beyond the tokenizer and image processor
            that decide its inputs (`processor_fingerprint`).
        pixel_rows: None where the processor's ``pixel_values`` hold one entry per image,
            ending in its processed ``(height, width)`` (checked against the geometry); where
            they are rows of flattened patches or of crops instead (several rows per image),
            ``(processor, its output)`` -> each image's number of rows.
    """

    name: str
    matches: Callable[[Any], bool]
    geometry: Callable[[Any, tuple[int, int], bool, int, str], Any]
    options: tuple[str, ...] = ()
    with_image_mode: Callable[[Any, str | None], Any] = _same
    with_anyres: Callable[[Any, str], Any] = _same
    places_image_tokens: bool = False
    fingerprint_parts: Callable[[Any], dict[str, Any]] = lambda processor: {}
    pixel_rows: Callable[[Any, Any], list[int]] | None = None


SINGLE_CROP = ProcessorAdapter(
    name="single-crop",
    matches=lambda processor: True,
    geometry=lambda processor, size, alone, patch_size, anyres: ImageGeometry.from_image_processor(
        processor.image_processor, size, patch_size
    ),
    options=("image_mode",),
    with_image_mode=with_image_mode,
)
"""An HF processor that makes one crop per image, a token per patch (pad, crop or squash)."""

ADAPTERS: list[ProcessorAdapter] = []
"""The registered adapters, the latest first; `SINGLE_CROP` when none matches."""


def register_adapter(adapter: ProcessorAdapter) -> ProcessorAdapter:
    """Add `adapter` ahead of those registered before it (a family module calls this once)."""
    ADAPTERS.insert(0, adapter)
    return adapter


def processor_adapter(processor: Any) -> ProcessorAdapter:
    """The adapter for `processor`: the latest registered one that matches, else
    `SINGLE_CROP`."""
    return next((adapter for adapter in ADAPTERS if adapter.matches(processor)), SINGLE_CROP)


def own_processor_adapter(processor_class: type, name: str, **fields: Any) -> ProcessorAdapter:
    """The adapter of an mmlens processor class that gives each image's geometry itself
    (``processor.image_geometry(original_size, tiled=alone_in_prompt)``); `fields` set the
    other `ProcessorAdapter` fields (`places_image_tokens`, `fingerprint_parts`,
    `pixel_rows`)."""
    return ProcessorAdapter(
        name=name,
        matches=lambda processor: isinstance(processor, processor_class),
        geometry=lambda processor, size, alone, patch_size, anyres: processor.image_geometry(
            size, tiled=alone
        ),
        **fields,
    )
