"""Tiny random LLaVA-NeXT (v1.6) checkpoints: `build_tiny_llava_next` (Vicuna, Mistral or
Llama-3 decoder) and llava-v1.6's "anyres" image processor (`make_anyres_image_processor`,
tile grids `TINY_GRID_PINPOINTS`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from mmlens.testing.common import _CLIP_PIXELS, _clip_config, _decoder_config, _save_random_model
from mmlens.testing.tokenizer import make_tokenizer


def make_anyres_image_processor(
    image_size: int = 28, grid_pinpoints: list[list[int]] | None = None
) -> LlavaNextImageProcessorPil:
    """A llava-NeXT ("anyres") image processor (PIL backend) with llava-v1.6's settings.

    Per image: the base crop is the whole image resized (squashed) to `image_size` x
    `image_size`; the tiles come from the image resized to fit the best of `grid_pinpoints`
    (``[height, width]`` each, multiples of `image_size`) keeping its aspect ratio, centred on a
    black canvas of that size, cut into `image_size` x `image_size` tiles in row-major order.
    Bicubic resampling, rescaling to [0, 1] and CLIP normalisation as in llava-1.5. Images with
    fewer tiles are padded with all-zero crops to the batch's largest count.

    Args:
        image_size: the vision tower's input side (336 for llava-v1.6).
        grid_pinpoints: candidate canvas sizes; default `TINY_GRID_PINPOINTS` (llava-v1.6's
            ``[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]`` at 28 px a tile).

    Examples:
        >>> import PIL.Image
        >>> processor = make_anyres_image_processor(28)
        >>> image = PIL.Image.new("RGB", (90, 40))        # the base crop, then 1 x 3 tiles
        >>> processor(image, return_tensors="pt")["pixel_values"].shape
        torch.Size([1, 4, 3, 28, 28])
    """
    return LlavaNextImageProcessorPil(
        do_pad=True,
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=grid_pinpoints or _scaled_pinpoints(image_size),
        **_CLIP_PIXELS,
    )


def _scaled_pinpoints(image_size: int) -> list[list[int]]:
    """llava-v1.6's grid pinpoints for tiles of `image_size` pixels."""
    return [[image_size * rows, image_size * cols] for rows, cols in _LLAVA_V16_TILE_GRIDS]


_LLAVA_V16_TILE_GRIDS = [(1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]

TINY_GRID_PINPOINTS = _scaled_pinpoints(28)
"""llava-v1.6's tile grids (1x2, 2x1, 2x2, 3x1, 1x3) at 28 px a tile: ``[[28, 56], [56, 28], ...]``."""


def build_tiny_llava_next(
    path: str | Path,
    *,
    family: str = "vicuna",
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    image_size: int = 28,
    patch_size: int = 7,
    image_grid_pinpoints: list[list[int]] | None = None,
    vision_feature_layer: int | list[int] = -2,
    rope_theta: float | None = None,
    sliding_window: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a random llava-hf LLaVA-NeXT (v1.6) checkpoint (safetensors + processor) to `path`.

    Architecture as llava-v1.6: CLIP ViT -> features of `vision_feature_layer` (CLS dropped) ->
    two-layer GELU projector, applied to the base crop and every tile; tiles are unpadded for
    the image's aspect ratio and each row of the tile grid ends with the learned
    `image_newline` embedding; the decoder of `family`:

    - ``"vicuna"`` (llava-v1.6-vicuna): Llama decoder, rotary base 10^4, Vicuna tokenizer.
    - ``"mistral"`` (llava-v1.6-mistral): Mistral decoder, rotary base 10^6, `sliding_window`
      (None as in Mistral-7B-v0.2), Mistral tokenizer.
    - ``"llama3"`` (llama3-llava-next-8b): Llama decoder, rotary base 5·10^5, Llama-3 tokenizer
      (EOS ``<|eot_id|>``).

    Defaults are llava-v1.6 at 1/12 scale: 28 px crops of 7 px patches (4 x 4 = 16 base tokens),
    `TINY_GRID_PINPOINTS` tile grids, so one image gives 16 + up to 8 x 9 = 88 image tokens.
    Weights are drawn as in `build_tiny_llava`, `image_newline` included.

    Args:
        path: folder to write (created if missing).
        family: "vicuna", "mistral" or "llama3" (see `FAMILIES`).
        n_layers, d_model, n_heads, n_kv_heads, d_mlp: decoder shape (`n_kv_heads` < `n_heads`
            for grouped-query attention; default `n_heads`).
        vision_layers, vision_d_model, vision_heads, image_size, patch_size: CLIP tower shape.
        image_grid_pinpoints: canvas sizes ``[height, width]``, multiples of `image_size`
            (default: llava-v1.6's grids at `image_size` per tile).
        vision_feature_layer: as in `transformers.LlavaNextConfig`.
        rope_theta: rotary base (default: the family's).
        sliding_window: Mistral's attention window (``"mistral"`` only).
        seed: weight seed (the tokenizer does not depend on it).

    Returns:
        `path` as a `Path`.

    Examples:
        >>> folder = build_tiny_llava_next("checkpoints/next", family="mistral", n_kv_heads=2)
        >>> LlavaNextForConditionalGeneration.from_pretrained(folder).config.text_config.model_type
        'mistral'
    """
    path = Path(path)
    tokenizer = make_tokenizer(family)
    pinpoints = image_grid_pinpoints or _scaled_pinpoints(image_size)
    config = LlavaNextConfig(
        vision_config=_clip_config(
            vision_layers, vision_d_model, vision_heads, image_size, patch_size
        ),
        text_config=_decoder_config(
            family,
            tokenizer,
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            d_mlp=d_mlp,
            rope_theta=rope_theta,
            sliding_window=sliding_window,
        ),
        image_grid_pinpoints=pinpoints,
        image_token_id=tokenizer.image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=False,
    )
    _save_random_model(LlavaNextForConditionalGeneration, config, path, seed)
    processor = LlavaNextProcessor(
        image_processor=make_anyres_image_processor(image_size, pinpoints),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(path)
    return path
