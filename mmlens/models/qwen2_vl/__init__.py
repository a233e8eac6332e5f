"""HookedQwen2VL: Qwen2-VL = a ViT on images of any size (2-D rotary, attention within each
image) + a 2 x 2 patch merger + a Qwen2 decoder with multimodal rotary positions (M-RoPE).

Each image token is one merged cell of 2 x 2 patches (28 px with the released 14 px patches);
the prompt wraps an image's tokens in ``<|vision_start|>`` ... ``<|vision_end|>``. The decoder
rotates by three position ids per token (time, row, column; `HookedQwen2VL.position_ids`): a
text token has its running position on all three; an image's tokens share the first (the
position where the image starts) and add their cell's row and column to it; the text after an
image continues from its start plus the image's longer side in cells. Generation continues
from there: a later token's position is its index among the real tokens plus the prompt's
`rope delta` (HF: ``get_rope_index``). Videos are not supported. HF:
`Qwen2VLForConditionalGeneration`.
"""

from __future__ import annotations

import itertools
import types
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from mmlens.components import RotaryEmbedding
from mmlens.config import MMConfig, VisionConfig
from mmlens.inputs.templates import ConversationTemplate, register_template
from mmlens.models.llava import HookedLlava, on_device_of
from mmlens.models.qwen2_vl.processor import Qwen2VLInputProcessor
from mmlens.models.qwen2_vl.vision import (
    HookedQwen2VLVision,
    Qwen2VLMerger,
    Qwen2VLVisionExtras,
    patch_grid_index,
)
from mmlens.models.registry import register
from mmlens.sequence import KVCache, rotary_position_ids

QWEN2_VL_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system text of Qwen2-VL's chat template."""

register_template(  # Qwen2-VL's chat template (ChatML, the image in vision markers)
    ConversationTemplate(
        name="qwen2_vl",
        pattern="{system}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
        default_system=QWEN2_VL_SYSTEM_PROMPT,
        image_slot="<|vision_start|>{token}<|vision_end|>",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>\n",
    )
)


def _rope_index_of_item(
    ids: Int[torch.Tensor, "real_pos"],
    image_token_id: int,
    grids: Any,
    merge_size: int,
) -> Int[torch.Tensor, "3 real_pos"]:
    """The (time, row, column) positions of one item's real tokens; `grids` yields the grid
    ``(t, h, w)`` of each image in turn."""
    parts, start = [], 0
    is_image = (ids == image_token_id).tolist()
    for image, run in itertools.groupby(is_image):
        length = len(list(run))
        while length:
            if not image:
                parts.append(torch.arange(start, start + length).expand(3, -1))
                start += length
                break
            t, h, w = (int(n) for n in next(grids))
            h, w = h // merge_size, w // merge_size
            times, rows, cols = torch.meshgrid(
                torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"
            )
            parts.append(torch.stack((times, rows, cols)).reshape(3, -1) + start)
            start += max(h, w)
            length -= t * h * w
            if length < 0:
                raise ValueError(
                    "image tokens and image_grid_thw disagree: one image's run is short"
                )
    return torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)


def mrope_positions(
    input_ids: Int[torch.Tensor, "batch pos"],
    attention_mask: Int[torch.Tensor, "batch pos"],
    image_grid_thw: Int[torch.Tensor, "image 3"] | None,
    *,
    image_token_id: int,
    merge_size: int = 2,
) -> tuple[Int[torch.Tensor, "3 batch pos"], Int[torch.Tensor, "batch"]]:
    """The (time, row, column) rotary positions of a prompt (padding at 0) and each item's rope
    delta (the position of its next token minus its count of real tokens), as HF's
    ``get_rope_index``; `image_grid_thw` holds each image's patch grid, in the order of the
    images in the batch.

    Examples:
        >>> grid = torch.tensor([[1, 4, 6]])   # one image: 4 x 6 patches, 2 x 3 merged cells
        >>> ids = torch.tensor([[5, 5, 9, 9, 9, 9, 9, 9, 5]])
        >>> positions, deltas = mrope_positions(ids, torch.ones_like(ids), grid, image_token_id=9)
        >>> positions[:, 0]
        tensor([[0, 1, 2, 2, 2, 2, 2, 2, 5],
                [0, 1, 2, 2, 2, 3, 3, 3, 5],
                [0, 1, 2, 3, 4, 2, 3, 4, 5]])
        >>> deltas   # the next token is at 6, the 10th real token
        tensor([-3])
    """
    grids = iter(torch.zeros(0, 3) if image_grid_thw is None else image_grid_thw.cpu())
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    deltas = torch.zeros(input_ids.shape[0], dtype=torch.long)
    real_rows = attention_mask.cpu().bool()
    for item, (ids, real) in enumerate(zip(input_ids.cpu(), real_rows, strict=True)):
        try:
            item_positions = _rope_index_of_item(ids[real], image_token_id, grids, merge_size)
        except StopIteration:
            raise ValueError(
                "the input has more images' tokens than image_grid_thw rows; pass the "
                "processor's image_grid_thw with its ids (model.prepare gives both)"
            ) from None
        positions[:, item, real] = item_positions
        if item_positions.numel():
            deltas[item] = int(item_positions.max()) + 1 - int(real.sum())
    device = input_ids.device
    return positions.to(device), deltas.to(device)


def qwen_vision_config(hf_vision: Any, *, d_model: int, d_mlp: int, kind: str) -> VisionConfig:
    """The `VisionConfig` of a Qwen-VL tower (no class token, no pre-layernorm; images of any
    size, so `image_size` is nominal: one merged cell)."""
    return VisionConfig(
        n_layers=hf_vision.depth,
        d_model=d_model,
        n_heads=hf_vision.num_heads,
        d_mlp=d_mlp,
        image_size=hf_vision.patch_size * hf_vision.spatial_merge_size,
        patch_size=hf_vision.patch_size,
        eps=1e-6,
        act_fn=hf_vision.hidden_act,
        n_channels=hf_vision.in_channels,
        kind=kind,
        has_cls=False,
        has_ln_pre=False,
    )


def qwen_extras_fields(hf_vision: Any, d_out: int) -> dict[str, Any]:
    """The `Qwen2VLVisionExtras` fields every Qwen-VL tower config names."""
    rope = getattr(hf_vision, "rope_parameters", None) or {}
    return dict(
        merge_size=hf_vision.spatial_merge_size,
        temporal_patch_size=hf_vision.temporal_patch_size,
        rope_theta=rope.get("rope_theta", 10000.0),
        d_out=d_out,
    )


@register("qwen2_vl")
class HookedQwen2VL(HookedLlava):
    """Qwen2-VL with hooks in the decoder, the vision tower (`vision.`: `hook_embed`,
    `blocks.{l}.*`, `hook_features`, all images' patches in one sequence of batch 1) and the
    merger (`merger.`).

    `hook_image_embeds` holds ``[1, n_image_tokens, d_model]``: every image's merged cells in
    turn, row-major; row ``i`` is ``inp.layout`` entry ``i``. Rotary position ids are
    ``[3, batch, pos]`` (`position_ids`).

    Examples:
        >>> from mmlens.testing import build_tiny_qwen2_vl
        >>> qwen = mmlens.from_pretrained(build_tiny_qwen2_vl("checkpoints/qwen2-vl"))
        >>> qwen_inp = qwen.prepare(image, "What colour is the star?")
        >>> qwen_inp.image_geometry[0].grid_size, len(qwen_inp.positions("image"))
        ((4, 4), 16)
    """

    image_inputs = ("pixel_values", "image_grid_thw")

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        if not isinstance(cfg.connector, Qwen2VLVisionExtras):
            raise ValueError(
                "HookedQwen2VL needs a Qwen2VLVisionExtras as cfg.connector (load a qwen2_vl "
                "folder with mmlens.from_pretrained)"
            )
        super().__init__(cfg, tokenizer, processor)
        self.rotary = RotaryEmbedding(
            cfg.d_head,
            cfg.rope_parameters,
            cfg.max_position_embeddings,
            sections=cfg.rope_parameters["mrope_section"],
        )
        self.default_template = "qwen2_vl"

    @property
    def token_patch_size(self) -> int:
        """A merged cell's side: the tower's patch times the merge size."""
        return self.cfg.vision.patch_size * self.cfg.connector.merge_size

    # ------------------------------------------------------------------ loading
    weight_prefixes = (
        (r"^(?:model\.)?visual\.merger\.", "merger."),
        (r"^(?:model\.)?visual\.", "vision."),
    )
    weight_renames = (
        (r"^vision\.patch_embed\.proj\.", "vision.embed.proj."),
        (r"^vision\.blocks\.(\d+)\.norm1\.", r"vision.blocks.\1.ln1."),
        (r"^vision\.blocks\.(\d+)\.norm2\.", r"vision.blocks.\1.ln2."),
        (r"^vision\.blocks\.(\d+)\.attn\.proj\.", r"vision.blocks.\1.attn.o_proj."),
    )

    decoder_type = "qwen2"
    """The HF model_type its text config is read as (`MMConfig.from_hf`)."""

    @classmethod
    def config_from_hf(cls, hf_config: Any, **overrides: Any) -> MMConfig:
        """The decoder (a `decoder_type` with `mrope_section` in its rope parameters, through
        `MMConfig.from_hf`), the tower (`cfg.vision`) and what the tower and merger have
        beyond it (`cfg.connector`, the family's `vision_from_hf`)."""
        text_fields = hf_config.text_config.to_dict()
        text = types.SimpleNamespace(**{**text_fields, "model_type": cls.decoder_type})
        if "mrope_section" not in (text.rope_parameters or {}):
            raise ValueError(
                f"a {type(hf_config).__name__}'s text config names its mrope_section in "
                "rope_parameters"
            )
        text.use_sliding_window = text_fields.get("use_sliding_window", False)
        vision, extras = cls.vision_from_hf(hf_config.vision_config)
        decoder = types.SimpleNamespace(
            text_config=text,
            model_type=hf_config.model_type,
            tie_word_embeddings=hf_config.tie_word_embeddings,
            name_or_path=getattr(hf_config, "name_or_path", ""),
        )
        fields = dict(
            vision=vision,
            connector=extras,
            image_token_id=hf_config.image_token_id,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
        )
        return MMConfig.from_hf(decoder, **{**fields, **overrides})

    @classmethod
    def vision_from_hf(cls, hf_vision: Any) -> tuple[VisionConfig, Qwen2VLVisionExtras]:
        """The tower's `VisionConfig` and what the tower and merger have beyond it."""
        vision = qwen_vision_config(
            hf_vision,
            d_model=hf_vision.embed_dim,
            d_mlp=int(hf_vision.embed_dim * hf_vision.mlp_ratio),
            kind="qwen2_vl",
        )
        return vision, Qwen2VLVisionExtras(**qwen_extras_fields(hf_vision, hf_vision.hidden_size))

    @classmethod
    def load_processor(cls, folder: Path, hf_config: Any) -> Qwen2VLInputProcessor:
        """mmlens' `Qwen2VLInputProcessor` (HF's needs a video processor, and so torchvision)."""
        return Qwen2VLInputProcessor.from_pretrained(folder)

    # ------------------------------------------------------------------ modules
    def build_connector(self, cfg: MMConfig) -> None:
        """Qwen2-VL's own tower (in place of the ViT `HookedLlava` builds) and the merger."""
        self.vision = HookedQwen2VLVision(cfg.vision, cfg.connector)
        self.merger = Qwen2VLMerger(cfg.vision, cfg.connector)

    def _layer_counts(self) -> dict[str, int]:
        return {"": self.cfg.n_layers, "vision.": self.cfg.vision.n_layers}

    def encode_images(
        self,
        pixel_values: Float[torch.Tensor, "patch pixels"],
        image_grid_thw: Int[torch.Tensor, "image 3"] | None = None,
        **unused: Any,
    ) -> Float[torch.Tensor, "1 image_token d_model"]:
        """Tower -> merger: every image's merged cells in turn, ``[1, n_image_tokens,
        d_model]``."""
        if image_grid_thw is None:
            raise ValueError("Qwen2-VL's pixels need image_grid_thw (model.prepare gives both)")
        features = self.vision(pixel_values, image_grid_thw)
        return self.merger(on_device_of(self.merger, features))

    # ------------------------------------------------------------------ pixels
    def vision_patch_index(
        self, inp: Any, image: int = 0
    ) -> tuple[int, Int[torch.Tensor, "rows cols"]]:
        """Batch row 0 (the tower holds every image's patches in one sequence) and each of
        image `image`'s patches' index in it, as the row-major patch grid: the processor gives
        each merged cell's patches together, cells row-major (`patch_grid_index`)."""
        grids = inp.extra_inputs["image_grid_thw"].cpu()
        start = int(grids[:image].prod(-1).sum())
        return 0, patch_grid_index(grids[image], self.cfg.connector.merge_size) + start

    def _patch_shape(self) -> tuple[int, int, int, int]:
        """One ``pixel_values`` row as ``(C, T, P, P)`` (HF's flattening, channel-major)."""
        patch = self.cfg.vision.patch_size
        return (self.cfg.vision.n_channels, self.cfg.connector.temporal_patch_size, patch, patch)

    def vision_pixels(
        self, inp: Any, image: int = 0
    ) -> Float[torch.Tensor, "channel height width"]:
        """Image `image`'s normalised pixels ``[C, H, W]``, put back together from its rows
        (first frame)."""
        _, index = self.vision_patch_index(inp, image)
        channels, _, patch, _ = self._patch_shape()
        rows, cols = index.shape
        patches = inp.pixel_values[index.flatten().to(inp.pixel_values.device)]
        patches = patches.view(rows, cols, *self._patch_shape())[:, :, :, 0]  # [r, c, C, P, P]
        return patches.permute(2, 0, 3, 1, 4).reshape(channels, rows * patch, cols * patch)

    def pixel_noise(
        self, pixel_values: torch.Tensor, std: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Gaussian noise of std `std` on the [0, 1] image, in the units of `pixel_values`
        rows (over ``image_std`` of each value's channel); a row's frames are one still image
        repeated, so they get the same noise: one draw per pixel of each patch, ``[n, C, P,
        P]``."""
        channels, frames, patch, _ = self._patch_shape()
        n = pixel_values.shape[0]
        image_std = torch.tensor(self.processor.image_processor.image_std).to(pixel_values)
        noise = torch.randn(
            (n, channels, 1, patch, patch), generator=generator, device=pixel_values.device
        )
        noise = noise.to(pixel_values) * (std / image_std.view(channels, 1, 1, 1))
        return noise.expand(n, channels, frames, patch, patch).reshape(pixel_values.shape)

    # ------------------------------------------------------------------ positions
    def rope_index(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        image_grid_thw: Int[torch.Tensor, "image 3"] | None = None,
    ) -> tuple[Int[torch.Tensor, "3 batch pos"], Int[torch.Tensor, "batch"]]:
        """`mrope_positions` with this model's image token and merge size."""
        return mrope_positions(
            input_ids,
            attention_mask,
            image_grid_thw,
            image_token_id=self.cfg.image_token_id,
            merge_size=self.cfg.connector.merge_size,
        )

    def position_ids(
        self,
        attention_mask: Int[torch.Tensor, "batch pos"],
        input_ids: Int[torch.Tensor, "batch pos"] | None = None,
        image_grid_thw: Int[torch.Tensor, "image 3"] | None = None,
        rope_deltas: Int[torch.Tensor, "batch"] | None = None,
        **unused: Any,
    ) -> Int[torch.Tensor, "3 batch pos"]:
        """Rotary position ids ``[3, batch, pos]`` (time, row, column): computed from the ids
        and image grids where the pass holds the whole sequence (`rope_index`); in a
        generation step, each position's index among the real tokens plus the prompt's
        `rope_deltas` on every axis.
        """
        if input_ids is not None and input_ids.shape[-1] == attention_mask.shape[-1]:
            return self.rope_index(input_ids, attention_mask, image_grid_thw)[0]
        positions = rotary_position_ids(attention_mask)
        if rope_deltas is not None:
            positions = positions + rope_deltas.to(positions.device)[:, None]
        return positions.expand(3, *positions.shape)

    def _run_decoder(
        self,
        resid: Float[torch.Tensor, "batch pos d_model"],
        attention_mask: Int[torch.Tensor, "batch pos"],
        cache: KVCache | None = None,
        *args: Any,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`HookedTransformer._run_decoder`, remembering the prompt's rope deltas on a KV
        cache (its first pass) and giving them to `position_ids` in later passes."""
        inputs = dict(inputs or {})
        if cache is not None:
            if cache.attention_mask.shape[1] == 0 and "input_ids" in inputs:
                _, cache.rope_deltas = self.rope_index(
                    inputs["input_ids"], attention_mask, inputs.get("image_grid_thw")
                )
            else:
                inputs["rope_deltas"] = getattr(cache, "rope_deltas", None)
        return super()._run_decoder(resid, attention_mask, cache, *args, inputs=inputs, **kwargs)
