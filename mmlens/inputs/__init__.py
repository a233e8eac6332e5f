"""`MultimodalInput`: token ids and pixels that know where every segment and image patch is.

Built by `MultimodalInput.from_processor` (what `HookedLlava.prepare` calls): the prompt is
rendered with a conversation template (`mmlens.inputs.templates`), the checkpoint's own HF processor
produces the tensors (so the ids are exactly HF's), and the fast tokenizer's character offsets of
the same text give the segments. Semantics (docs/semantics.md):

- Positions index the full padded sequence of one batch item, image tokens expanded. Batches are
  left-padded; pad positions belong to no segment.
- Segments: ``system`` = every real position before the first image token; ``image`` = the image
  tokens; ``user`` = from the first position after the image block to the last prompt position;
  ``question`` = the tokens overlapping the question's characters; ``last`` = the last prompt
  position. Text-only prompts have no image block: ``system`` ends, and ``user`` starts, at the
  first token that reaches into the user's content.
  For a tiled image, ``image`` holds the base grid, the tiles and the newline tokens, in model
  order.
- Image-token layout (`ImageTokenLayout`): for every image token its batch item, image, tile
  (0 = the base image, 1.. = tiles, -1 = a newline token), patch row and column, and kind
  (patch, CLS, newline, query).
- `MultimodalInput.patches_in_box` maps a box in original-image pixels through the image's
  geometry (`ImageGeometry` for one crop; a family's own for tiles or queries, read through its
  processor adapter, `mmlens.inputs.adapters`) to the image tokens whose patches it touches.

This package names no model family: what differs between families comes through
`mmlens.models.family` (docs/architecture.md).

Examples:
    >>> inp = MultimodalInput.from_processor(model.processor, image, "What color is the star?")
    >>> len(inp.positions("image"))   # 8 x 8 patches here; 576 for llava-1.5
    64
    >>> inp.find("star")              # the token(s) of "star"
    tensor([100])
    >>> len(inp.patches_in_box((0, 0, 56, 28)))   # image tokens showing the top-left 56x28 pixels
    8
    >>> logits = model(inp)
"""

from mmlens.inputs.adapters import ProcessorAdapter, processor_adapter, register_adapter
from mmlens.inputs.geometry import ImageGeometry, box_from_xywh, with_image_mode
from mmlens.inputs.images import as_image
from mmlens.inputs.layout import CLS, NEWLINE, PATCH, QUERY, TOKEN_KINDS, Box, ImageTokenLayout
from mmlens.inputs.multimodal import MultimodalInput, input_settings, processor_fingerprint
from mmlens.inputs.segments import SEGMENTS
from mmlens.inputs.templates import ConversationTemplate, get_template, register_template, render

__all__ = [
    "CLS",
    "NEWLINE",
    "PATCH",
    "QUERY",
    "SEGMENTS",
    "TOKEN_KINDS",
    "Box",
    "ConversationTemplate",
    "ImageGeometry",
    "ImageTokenLayout",
    "MultimodalInput",
    "ProcessorAdapter",
    "input_settings",
    "as_image",
    "box_from_xywh",
    "get_template",
    "processor_adapter",
    "processor_fingerprint",
    "register_adapter",
    "register_template",
    "render",
    "with_image_mode",
]
