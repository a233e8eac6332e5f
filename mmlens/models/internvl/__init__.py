"""HookedInternVL: InternVL (transformers' ``internvl``: the ``-hf`` releases of InternVL3 and
InternVL3.5) = InternViT + pixel shuffle + an MLP connector + a Qwen2 or Llama decoder.

Each image is cut into tiles (between ``min_patches`` and ``max_patches``, the grid whose aspect
ratio is closest to the image's, the image squashed onto it) plus, where there is more than one
tile, a thumbnail of the whole image (`mmlens.models.internvl.processor`). Every crop goes
through InternViT on its own; its patches (32 x 32 at 448 px) are pixel-shuffled 2 x 2 into
16 x 16 tokens and projected. In the prompt an image is ``<img>``, every crop's tokens (tiles
row-major, then the thumbnail), ``</img>``. HF: `InternVLForConditionalGeneration`. The
original remote-code releases (``InternVLChatModel`` with InternLM2 decoders: InternVL2 /
InternVL2.5) load as this class too, read natively (`mmlens.models.internvl.release`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from mmlens.config import MMConfig, VisionConfig
from mmlens.inputs.templates import ConversationTemplate, register_template
from mmlens.loading import CheckpointFormat, register_checkpoint_format
from mmlens.models.internvl.processor import InternVLInputProcessor
from mmlens.models.internvl.release import (
    is_internvl_release,
    release_config,
    release_processor,
    release_tensors,
)
from mmlens.models.internvl.vision import (
    HookedInternViT,
    InternVLConnectorConfig,
    PixelShuffleProjector,
)
from mmlens.models.llava import HookedLlava, on_device_of
from mmlens.models.registry import register

INTERNLM2_CHAT_SYSTEM_PROMPT = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
"""The system message of InternVL2's ``internlm2-chat`` conversation."""
INTERNVL2_5_SYSTEM_PROMPT = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
"""The system message of InternVL2.5's ``internvl2_5`` conversation."""

register_template(  # the release's `internlm2-chat` (MPT style, separator "<|im_end|>")
    ConversationTemplate(
        name="internlm2_chat",
        pattern="{system}<|im_start|>user\n{image}{question}<|im_end|><|im_start|>assistant\n",
        default_system=INTERNLM2_CHAT_SYSTEM_PROMPT,
        image_slot="{token}\n",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>",
    )
)
register_template(  # the release's `internvl2_5` (MPT style, separator "<|im_end|>\n")
    ConversationTemplate(
        name="internvl2_5",
        pattern="{system}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
        default_system=INTERNVL2_5_SYSTEM_PROMPT,
        image_slot="{token}\n",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>\n",
    )
)
register_template(  # InternVL -hf's chat template: ChatML, the image first in the user's turn
    ConversationTemplate(
        name="internvl",
        pattern="{system}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
        default_system="",
        image_slot="{token}\n",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>\n",
    )
)


def _pair(value: Any) -> int:
    """One side of a square HF size (an int or a pair)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise NotImplementedError(f"InternViT size {value}: square crops only")
        return int(value[0])
    return int(value)


@register("internvl")
class HookedInternVL(HookedLlava):
    """InternVL with hooks in the decoder, InternViT (`vision.`: every crop a row,
    ``[n_crops, 1 + n_patches, d_vision]``, class token first) and the connector
    (`projector.hook_in`: the pixel-shuffled features, ``[n_crops, n_tokens, 4 * d_vision]``;
    `projector.hook_out`).

    `hook_image_embeds` holds ``[n_crops, tokens_per_crop, d_model]``: each image's tiles then
    its thumbnail, images in batch order; flattened, row ``i`` is ``inp.layout`` entry ``i``.
    In `inp.layout` the thumbnail is tile 0 (the base grid, `patch_grid`) and the tiles are
    1, 2, ... on the high-resolution token grid (`highres_grid`).

    Examples:
        >>> from mmlens.testing import make_test_image
        >>> inp = internvl.prepare(make_test_image(90, 40), "What colour is the star?")
        >>> inp.image_geometry[0].grid.tiles, inp.layout.highres_grid(0).shape
        ((1, 2), torch.Size([4, 8]))
        >>> logits, cache = internvl.run_with_cache(inp)
        >>> cache["hook_image_embeds"].shape     # 2 tiles + thumbnail, 4 x 4 tokens each
        torch.Size([3, 16, 64])
    """

    paper_window_sizes = {}

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        if not isinstance(cfg.connector, InternVLConnectorConfig):
            raise ValueError(
                "HookedInternVL needs an InternVLConnectorConfig as cfg.connector (load an "
                "internvl folder with mmlens.from_pretrained)"
            )
        super().__init__(cfg, tokenizer, processor)
        self.default_template = cfg.connector.template

    @property
    def token_patch_size(self) -> int:
        """One image token's side: the tower's patch times the pixel shuffle's 2."""
        return self.cfg.vision.patch_size * self.cfg.connector.merge_size

    # ------------------------------------------------------------------ loading
    weight_renames = (
        (r"^vision\.embeddings\.cls_token$", "vision.embed.class_embedding"),
        (r"^vision\.embeddings\.position_embeddings$", "vision.embed.position_embedding"),
        (r"^vision\.embeddings\.patch_embeddings\.projection\.", "vision.embed.patch_embedding."),
        (r"^vision\.encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"vision.blocks.\1.attn.o_proj."),
        (r"^vision\.encoder\.layer\.(\d+)\.attention\.", r"vision.blocks.\1.attn."),
        (r"^vision\.encoder\.layer\.(\d+)\.layernorm_before\.", r"vision.blocks.\1.ln1."),
        (r"^vision\.encoder\.layer\.(\d+)\.layernorm_after\.", r"vision.blocks.\1.ln2."),
        (r"^vision\.encoder\.layer\.(\d+)\.", r"vision.blocks.\1."),
        (r"^vision\.layernorm\.", "vision.ln_post."),
    )  # fmt: skip

    @classmethod
    def config_from_hf(cls, hf_config: Any, **overrides: Any) -> MMConfig:
        """The decoder (`MMConfig.from_hf`: Qwen2 or Llama), InternViT (`cfg.vision`) and the
        connector's settings (`cfg.connector`)."""
        hf_vision = hf_config.vision_config
        if getattr(hf_vision, "use_mask_token", False):
            raise NotImplementedError("InternViT with use_mask_token (masked image modelling)")
        if not getattr(hf_vision, "use_absolute_position_embeddings", True):
            raise NotImplementedError("InternViT without absolute position embeddings")
        if hf_config.vision_feature_select_strategy != "default":
            raise NotImplementedError(
                f"vision_feature_select_strategy={hf_config.vision_feature_select_strategy!r}: "
                "InternVL pixel-shuffles the patches without the class token ('default')"
            )
        vision = VisionConfig(
            n_layers=hf_vision.num_hidden_layers,
            d_model=hf_vision.hidden_size,
            n_heads=hf_vision.num_attention_heads,
            d_mlp=hf_vision.intermediate_size,
            image_size=_pair(hf_vision.image_size),
            patch_size=_pair(hf_vision.patch_size),
            eps=hf_vision.layer_norm_eps,
            act_fn=hf_vision.hidden_act,
            n_channels=hf_vision.num_channels,
            kind="internvit",
            has_cls=True,
            has_ln_pre=False,
            # Without mean pooling, HF norms the last layer's output (`layernorm`).
            has_ln_post=not hf_vision.use_mean_pooling,
            conv_bias=True,
        )
        connector = InternVLConnectorConfig(
            downsample_ratio=hf_config.downsample_ratio,
            norm_type=hf_vision.norm_type,
            qk_norm=hf_vision.use_qk_norm,
            attention_bias=hf_vision.attention_bias,
            d_out=hf_config.text_config.hidden_size,
            projector_act=hf_config.projector_hidden_act,
            **getattr(hf_config, "mmlens_release", {}),  # an original release's settings
        )
        connector.merge_size  # noqa: B018  (refuses ratios other than 1 / n here)
        limit = getattr(hf_config, "mmlens_rotary_limit", None)  # an original InternLM2 release
        return MMConfig.from_hf(
            hf_config,
            **{
                "vision": vision,
                "connector": connector,
                "rotary_limit": limit,
                "rotary_limit_reason": "InternLM2's dynamic rotary scaling changes its base",
                **overrides,
            },
        )

    @classmethod
    def load_processor(cls, folder: Path, hf_config: Any) -> InternVLInputProcessor:
        """mmlens' `InternVLInputProcessor` (HF's is built with a video processor, which needs
        torchvision)."""
        return InternVLInputProcessor.from_pretrained(folder)

    # ------------------------------------------------------------------ modules
    def build_connector(self, cfg: MMConfig) -> None:
        """InternViT (in place of the ViT `HookedLlava` builds) and the pixel-shuffle MLP."""
        self.vision = HookedInternViT(cfg.vision, cfg.connector)
        self.projector = PixelShuffleProjector(cfg.vision, cfg.connector)

    def encode_images(
        self, pixel_values: Float[torch.Tensor, "crop channel height width"], **unused: Any
    ) -> Float[torch.Tensor, "crop token d_model"]:
        """Every crop through InternViT (class token dropped), pixel-shuffled and projected:
        ``[n_crops, tokens_per_crop, d_model]``, crops in the processor's order."""
        features = self.vision(
            pixel_values, self.cfg.vision_feature_layers, self.cfg.vision_feature_select_strategy
        )
        return self.projector(on_device_of(self.projector, features))

    # ------------------------------------------------------------------ pixels
    def _thumbnail_row(self, inp: Any, image: int) -> int:
        """The ``pixel_values`` row of image `image`'s thumbnail (its last crop; its only one
        where it has one tile)."""
        return sum(geometry.n_crops for geometry in inp.image_geometry[: image + 1]) - 1

    def vision_patch_index(
        self, inp: Any, image: int = 0
    ) -> tuple[int, Int[torch.Tensor, "rows cols"]]:
        """The thumbnail's batch row in the vision hooks and each of its patches' index (after
        the class token), as its row-major patch grid: the crop that shows the whole image."""
        rows, cols = inp.image_geometry[image].vision_view.grid_size
        return self._thumbnail_row(inp, image), torch.arange(rows * cols).reshape(rows, cols) + 1

    def vision_pixels(
        self, inp: Any, image: int = 0
    ) -> Float[torch.Tensor, "channel height width"]:
        """Image `image`'s thumbnail as InternViT sees it (normalised pixels)."""
        return inp.pixel_values[self._thumbnail_row(inp, image)]


register_checkpoint_format(
    CheckpointFormat(
        name="original InternVL release",
        matches=is_internvl_release,
        hf_config=release_config,
        processor=release_processor,
        tensors=release_tensors,
        prepare_defaults=lambda folder, template: {"template": template},
        reads_every_file=True,
    )
)
