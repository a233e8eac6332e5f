"""HookedLlavaNext: LLaVA-NeXT (v1.6) = HookedLlava + anyres tiles, unpadding and `image_newline`.

Each image is seen twice by the vision tower: as a base crop (the whole image squashed to the
vision input size) and as tiles of the best canvas for its size (`image_grid_pinpoints`). The
projected tile features are laid side by side, the rows or columns that only showed the canvas'
padding are dropped ("spatial_unpad"), and every remaining row ends with the learned
`image_newline` embedding. The image's tokens are the base grid, then those rows (HF's
`LlavaNextModel.pack_image_features`); their number depends on the image size, so images of one
batch differ in length.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

from mmlens.config import MMConfig
from mmlens.inputs.templates import default_template
from mmlens.models.llava import HookedLlava
from mmlens.models.llava_next.geometry import AnyresGrid
from mmlens.models.registry import register


@register("llava_next")
class HookedLlavaNext(HookedLlava):
    """LLaVA-NeXT with the hooks of `HookedLlava`.

    Hook points keep HookedLlava's names. `vision.*` and `projector.*` see every crop
    (``[n_crops, ...]``: each image's base crop then its tiles, images in batch order);
    `hook_image_embeds` holds ``[1, n_image_tokens, d_model]``: the packed sequences of all images
    of the batch, one after the other, newline embeddings included, exactly the rows that fill
    the image slots. Row ``i`` is the image token described by ``inp.layout`` entry ``i``.

    Examples:
        >>> model = mmlens.from_pretrained("tiny-llava-next")  # a random one the tests build
        >>> inp = model.prepare(image, "What colour is the door?")
        >>> logits, cache = model.run_with_cache(inp)
        >>> cache["hook_image_embeds"].shape  # [1, len(inp.positions("image")), d_model]
        torch.Size([1, 88, 64])
        >>> inp.layout.highres_grid(0).shape  # the unpadded tile grid: (36, 48) at 640 x 480
        torch.Size([8, 8])
    """

    image_inputs = ("pixel_values", "image_sizes", "anyres")
    paper_window_sizes = {
        # The Cross-modal paper plotted window 7 for both of its LLaVA-NeXT checkpoints.
        "cross_modal_flow": {"llava-v1.6-vicuna-7b": 7, "llama3-llava-next-8b": 7}
    }
    tile_feature_strategy = "default"
    """The vision features the tiles are packed from (CLIP's patches, class token dropped)."""

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        if not cfg.image_grid_pinpoints:
            raise ValueError(
                "HookedLlavaNext needs cfg.image_grid_pinpoints (the anyres canvas sizes); load a "
                "llava_next checkpoint with mmlens.from_pretrained"
            )
        if cfg.vision_feature_select_strategy != self.tile_feature_strategy:
            raise NotImplementedError(
                f"vision_feature_select_strategy={cfg.vision_feature_select_strategy!r}: "
                f"{type(self).__name__} packs tiles with {self.tile_feature_strategy!r} features "
                "only ('default': the CLIP class token dropped), as in HF"
            )
        super().__init__(cfg, tokenizer, processor)
        self.image_newline = nn.Parameter(torch.empty(cfg.d_model))  # ends each tile-grid row
        # The checkpoint family's template (Llama-3, ChatML, Mistral instruct or vicuna_v1).
        self.default_template = default_template(self.tokenizer, cfg.decoder_model_type)

    def tile_grid(self, image_size: tuple[int, int], anyres: str = "hf") -> AnyresGrid:
        """Tiles and unpadding of an image of ``(height, width)`` `image_size` (rule `anyres`,
        `mmlens.models.llava_next.geometry.ANYRES_RULES`)."""
        vision = self.cfg.vision
        return AnyresGrid.for_image(
            image_size, self.cfg.image_grid_pinpoints, vision.image_size, vision.patch_size, anyres
        )

    def tile_grids(
        self,
        image_sizes: list[list[int]],
        anyres: str = "hf",
        batch_num_images: Int[torch.Tensor, "item"] | None = None,
    ) -> list[AnyresGrid | None]:
        """The tile grid of each image (LLaVA-NeXT tiles them all; see `HookedLlavaOnevision`)."""
        return [self.tile_grid(size, anyres) for size in image_sizes]

    def encode_images(
        self,
        pixel_values: Float[torch.Tensor, "image crop channel height width"]
        | Float[torch.Tensor, "crop channel height width"],
        image_sizes: Int[torch.Tensor, "image 2"] | list | None = None,
        anyres: str = "hf",
        batch_num_images: Int[torch.Tensor, "item"] | None = None,
        **unused: Any,
    ) -> Float[torch.Tensor, "1 image_token d_model"]:
        """Every crop through the vision tower and projector, then each image packed.

        Args:
            pixel_values: the processor's ``[n_images, max_crops, ...]`` (crops past an image's
                own count are padding and are skipped), or its real crops concatenated.
            image_sizes: ``(height, width)`` of each original image (a tensor or a list).
            anyres: the tiling rule the pixels were made with (``inp.anyres``): ``"hf"`` or
                ``"llava"`` (the original code's canvas choice and unpadding).
            batch_num_images: LLaVA-OneVision: the number of images of each prompt that has
                any (an image among several is not tiled); LLaVA-NeXT tiles every image.

        Returns:
            the packed image sequences of all images, concatenated (see the class doc).
        """
        if image_sizes is None:
            raise ValueError(
                "LLaVA-NeXT needs image_sizes (each original image's (height, width)) with "
                "pixel_values; pass inp = model.prepare(...) or the processor's image_sizes"
            )
        image_sizes = torch.as_tensor(image_sizes).reshape(-1, 2)
        grids = self.tile_grids(image_sizes.tolist(), anyres, batch_num_images)
        n_crops = [1 + (grid.n_tiles if grid is not None else 0) for grid in grids]
        crop_embeds = super().encode_images(_real_crops(pixel_values, n_crops))
        packed = [
            self.pack_image(embeds, grid)
            for embeds, grid in zip(crop_embeds.split(n_crops), grids, strict=True)
        ]
        return torch.cat(packed)[None]

    def pack_image(
        self, crop_embeds: Float[torch.Tensor, "crop patch d_model"], grid: AnyresGrid | None
    ) -> Float[torch.Tensor, "image_token d_model"]:
        """One image's tokens: base grid, then each row of the tile token grid (the kept grid;
        OneVision: its bilinear downsampling, `AnyresGrid.token_grid`) and a newline embedding.
        An image without tiles (OneVision, several images in a prompt): base grid, then one
        newline embedding."""
        if grid is None:
            newline = self.image_newline.to(crop_embeds.dtype)[None]
            return torch.cat([crop_embeds[0], newline])
        kept = grid.pack(crop_embeds[1:])
        newlines = self.image_newline.to(kept.dtype).expand(kept.shape[0], 1, -1)
        return torch.cat([crop_embeds[0], torch.cat([kept, newlines], dim=1).flatten(0, 1)])


def _real_crops(
    pixel_values: torch.Tensor, n_crops: list[int]
) -> Float[torch.Tensor, "crop channel height width"]:
    """The crops of every image, concatenated, without the processor's all-zero padding crops."""
    if pixel_values.ndim == 5:
        if pixel_values.shape[0] != len(n_crops) or pixel_values.shape[1] < max(n_crops):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} do not fit image_sizes, "
                f"whose images need {n_crops} crops (base + tiles); pass the processor's "
                "pixel_values and image_sizes together"
            )
        return torch.cat([crops[:n] for crops, n in zip(pixel_values, n_crops, strict=True)])
    if pixel_values.ndim == 4 and pixel_values.shape[0] == sum(n_crops):
        return pixel_values
    raise ValueError(
        f"pixel_values of shape {tuple(pixel_values.shape)}: expected [n_images, max_crops, "
        f"channel, height, width] or the {sum(n_crops)} real crops [crop, channel, height, width] "
        "that image_sizes call for"
    )
