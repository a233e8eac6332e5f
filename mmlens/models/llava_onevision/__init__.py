"""HookedLlavaOnevision: LLaVA-OneVision = HookedLlavaNext with a SigLIP tower, a Qwen2 decoder,
tile grids downsampled above ``anyres_max_N`` and untiled images in several-image prompts.

An image alone in its prompt is seen as in LLaVA-NeXT (base crop, then the tiles of the best of
`image_grid_pinpoints`, unpadded), except that a kept tile grid of more than about N tiles' worth
of patches (``vision_aspect_ratio="anyres_max_9"``) is shrunk by bilinear interpolation before
the newline embeddings are added (`mmlens.models.llava_next.geometry.AnyresGrid`). An image among several in
one prompt is padded to a square and gives only its patch grid and one newline embedding (HF's
`LlavaOnevisionModel.pack_image_features` with ``batch_num_images``). Videos are not supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int

from mmlens.config import MMConfig
from mmlens.inputs.templates import ConversationTemplate, register_template
from mmlens.models.llava_next import HookedLlavaNext
from mmlens.models.llava_next.geometry import AnyresGrid
from mmlens.models.llava_onevision.processor import OnevisionProcessor, max_tile_patches
from mmlens.models.registry import register

QWEN_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system text of the original `conv_qwen` (``qwen_1_5``), which LLaVA-OneVision used."""

register_template(  # the original `conv_qwen` ("qwen_1_5"): LLaVA-OneVision's training format
    ConversationTemplate(
        name="qwen_1_5",
        pattern=("{system}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"),
        default_system=QWEN_SYSTEM_PROMPT,
        image_slot="{token}\n",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>\n",
    )
)


@register("llava_onevision")
class HookedLlavaOnevision(HookedLlavaNext):
    """LLaVA-OneVision with the hooks of `HookedLlava` (`vision.*` for the SigLIP tower, whose
    patches are every token: no class token).

    `hook_image_embeds` holds ``[1, n_image_tokens, d_model]`` as in `HookedLlavaNext`: each
    image's base grid, then its token grid (the downsampled one where the model shrinks it) row
    by row with newline embeddings; row ``i`` is ``inp.layout`` entry ``i``.

    Examples:
        >>> onevision_model = mmlens.from_pretrained("tiny-llava-onevision")  # a random one
        >>> inp = onevision_model.prepare(image, "What colour is the door?")    # 112 x 112 px
        >>> grid = inp.image_geometry[0].grid   # 3 x 3 tiles of 4 x 4 patches, downsampled
        >>> grid.tiles, grid.unpadded_size, grid.token_grid_size, len(inp.positions("image"))
        ((3, 3), (12, 12), (5, 5), 46)
        >>> pair = onevision_model.prepare([image, image], "Is <image> the same as <image>?")
        >>> pair.image_geometry[0].n_image_tokens(has_cls=False)  # 4 x 4 patches + 1 newline
        17
    """

    image_inputs = ("pixel_values", "image_sizes", "batch_num_images")
    tile_feature_strategy = "full"

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        self.max_tile_patches = max_tile_patches(cfg.vision_aspect_ratio or "anyres_max_9")
        super().__init__(cfg, tokenizer, processor)
        # The original LLaVA-OneVision code's conversation (`conv_qwen`, docs/checkpoints.md).
        self.default_template = "qwen_1_5"

    @classmethod
    def load_processor(cls, folder: Path, hf_config: Any) -> OnevisionProcessor:
        """mmlens' `OnevisionProcessor` (HF's needs a video processor, and so torchvision)."""
        return OnevisionProcessor.from_pretrained(folder, hf_config.vision_config.patch_size)

    def tile_grid(self, image_size: tuple[int, int], anyres: str = "hf") -> AnyresGrid:
        """Tiles, unpadding and downsampling of an image of ``(height, width)`` `image_size`."""
        if anyres != "hf":
            raise ValueError(
                f"anyres={anyres!r}: LLaVA-OneVision is tiled by its own rule only (Hugging "
                "Face's canvas choice and unpadding, then anyres_max downsampling); use 'hf'"
            )
        vision = self.cfg.vision
        return AnyresGrid.for_image(
            image_size,
            self.cfg.image_grid_pinpoints,
            vision.image_size,
            vision.patch_size,
            max_tile_patches=self.max_tile_patches,
        )

    def tile_grids(
        self,
        image_sizes: list[list[int]],
        anyres: str = "hf",
        batch_num_images: Int[torch.Tensor, "item"] | None = None,
    ) -> list[AnyresGrid | None]:
        """The tile grid of each image; None for an image among several in its prompt (HF:
        without `batch_num_images`, every image is tiled)."""
        if batch_num_images is None:
            tiled = [True] * len(image_sizes)
        else:
            counts = torch.as_tensor(batch_num_images).tolist()
            tiled = [count == 1 for count in counts for _ in range(count)]
            if len(tiled) != len(image_sizes):
                raise ValueError(
                    f"batch_num_images {counts} count {len(tiled)} images, image_sizes "
                    f"{len(image_sizes)}; pass the processor's outputs together"
                )
        return [
            self.tile_grid(size, anyres) if alone else None
            for size, alone in zip(image_sizes, tiled, strict=True)
        ]
