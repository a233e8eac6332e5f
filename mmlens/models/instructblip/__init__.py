"""HookedInstructBlip: InstructBLIP = BLIP-2's ViT + the Q-Former (which reads the instruction)
+ a linear `language_projection` + a hooked Vicuna/Llama decoder.

The vision tower's last layer, layernormed, is read by the Q-Former's learned query tokens through
cross-attention while they also attend to the instruction's tokens; the queries' last states are
projected to the decoder's width and fill the image slots, which come first in the prompt. The
decoder therefore sees `num_query_tokens` (32) image tokens whatever the image, none of which is
a patch: `patches_in_box` on decoder positions is an error, and maps over the image go through the
Q-Former's cross-attention (docs/checkpoints.md). Flan-T5 InstructBLIP checkpoints (an
encoder-decoder language model) are not supported. HF: `InstructBlipForConditionalGeneration`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import nn

from mmlens.config import MMConfig
from mmlens.inputs.templates import ConversationTemplate, register_template
from mmlens.models.instructblip.processor import QFormerProcessor
from mmlens.models.instructblip.qformer import HookedQFormer, QFormerConfig
from mmlens.models.llava import HookedLlava, on_device_of
from mmlens.models.registry import register
from mmlens.models.vision import vision_config_from_hf

register_template(  # InstructBLIP has no conversation: the instruction is the prompt
    ConversationTemplate(
        name="instructblip",
        pattern="{image}{system}{question}",
        default_system="",
        image_slot="{token}",
        last_token="the last token of the instruction (the last prompt token)",
    )
)


@register("instructblip")
class HookedInstructBlip(HookedLlava):
    """InstructBLIP (Vicuna/Llama decoder) with hooks in the decoder, the vision tower
    (`vision.`, its final norm `vision.ln_post`) and the Q-Former (`qformer.`).

    `hook_image_embeds` holds ``[n_images, n_query_tokens, d_model]``: the projected queries, in
    the order of the image slots (`inp.layout` kind "query", `col` the query's index).

    Examples:
        >>> blip_model = mmlens.from_pretrained("tiny-instructblip")   # a random one
        >>> inp = blip_model.prepare(image, "What colour is the star?")
        >>> logits, cache = blip_model.run_with_cache(inp)
        >>> inp.positions("image").tolist() == list(range(8))   # the queries come first
        True
        >>> cache["qformer.blocks.0.cross_attn.hook_pattern"].shape  # [image, head, query, CLS + patches]
        torch.Size([1, 4, 8, 17])
    """

    image_inputs = ("pixel_values", "qformer_input_ids", "qformer_attention_mask")
    image_tokens_are_patches = False  # each query mixes every patch
    spread_note = (
        "each query token's relevance, spread over the patches by the Q-Former's "
        "cross-attention (mean over heads and blocks)."
    )
    """How `tokens_to_patches` takes a map over the queries to the patches, in words."""

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        if not isinstance(cfg.connector, QFormerConfig):
            raise ValueError(
                "HookedInstructBlip needs a QFormerConfig as cfg.connector (load an instructblip "
                "folder with mmlens.from_pretrained)"
            )
        super().__init__(cfg, tokenizer, processor)
        self.default_template = "instructblip"

    def spread_hook_names(self) -> list[str]:
        """The Q-Former's cross-attention patterns (what `tokens_to_patches` reads)."""
        return [name for name in self.hook_dict if name.endswith("cross_attn.hook_pattern")]

    def tokens_to_patches(
        self, activations: Mapping[str, torch.Tensor], image: int = 0
    ) -> Float[torch.Tensor, "query patch"]:
        """How the queries read the patches of image `image`: the Q-Former's cross-attention
        patterns (`spread_hook_names` in `activations`, a cache or a dict), mean over heads and
        cross-attention blocks, the class token's column dropped; each query's row sums to its
        attention on patches (below 1 by what it gave the class token). A map over the queries
        times this matrix is a map over the patches (row-major on the vision grid).

        Examples:
            >>> blip_inp = blip_model.prepare(image, "What colour is the star?")
            >>> _, cache = blip_model.run_with_cache(blip_inp)
            >>> blip_model.tokens_to_patches(cache).shape     # 8 queries, 4 x 4 patches
            torch.Size([8, 16])
        """
        names = self.spread_hook_names()
        stacked = torch.stack([activations[name][image].detach().float() for name in names])
        return stacked.mean((0, 1))[:, int(self.cfg.vision.has_cls) :].cpu()

    def build_connector(self, cfg: MMConfig) -> None:
        """The Q-Former and the linear projection to the decoder's width."""
        self.qformer = HookedQFormer(cfg.connector)
        self.language_projection = nn.Linear(cfg.connector.d_model, cfg.d_model)

    weight_prefixes = (
        # Its tower's final norm is used (the Q-Former reads it), unlike CLIP's.
        (r"^(?:model\.)?vision_model\.post_layernorm\.", "vision.ln_post."),
        (r"^(?:model\.)?qformer\.", "qformer."),
        (r"^(?:model\.)?query_tokens$", "qformer.query_tokens"),
        (r"^(?:model\.)?language_projection\.", "language_projection."),
    )
    weight_renames = (
        (r"^qformer\.embeddings\.word_embeddings\.", "qformer.word_embed."),
        (r"^qformer\.embeddings\.position_embeddings\.", "qformer.pos_embed."),
        (r"^qformer\.embeddings\.layernorm\.", "qformer.ln_embed."),
        (r"^qformer\.encoder\.layer\.(\d+)\.attention\.attention\.", r"qformer.blocks.\1.attn."),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.dense\.",
            r"qformer.blocks.\1.attn.out.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.",
            r"qformer.blocks.\1.ln_attn.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.",
            r"qformer.blocks.\1.cross_attn.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.dense\.",
            r"qformer.blocks.\1.cross_attn.out.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.",
            r"qformer.blocks.\1.ln_cross.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.intermediate_query\.dense\.",
            r"qformer.blocks.\1.mlp_query.fc1.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.output_query\.dense\.",
            r"qformer.blocks.\1.mlp_query.fc2.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.output_query\.LayerNorm\.",
            r"qformer.blocks.\1.ln_mlp_query.",
        ),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.intermediate\.dense\.",
            r"qformer.blocks.\1.mlp_text.fc1.",
        ),
        (r"^qformer\.encoder\.layer\.(\d+)\.output\.dense\.", r"qformer.blocks.\1.mlp_text.fc2."),
        (
            r"^qformer\.encoder\.layer\.(\d+)\.output\.LayerNorm\.",
            r"qformer.blocks.\1.ln_mlp_text.",
        ),
    )

    @classmethod
    def config_from_hf(cls, hf_config: Any, **overrides: Any) -> MMConfig:
        """The decoder's fields, BLIP-2's tower, and the Q-Former, which reads the tower's
        last layer with its class token (post-layernormed)."""
        return MMConfig.from_hf(
            hf_config,
            vision=vision_config_from_hf(hf_config.vision_config),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            connector=QFormerConfig.from_hf(hf_config.qformer_config, hf_config.num_query_tokens),
            **overrides,
        )

    @classmethod
    def load_processor(cls, folder: Path, hf_config: Any) -> QFormerProcessor:
        """mmlens' `QFormerProcessor` (image tokens first, batches left-padded before them)."""
        if not hf_config.use_decoder_only_language_model:
            raise NotImplementedError(
                "InstructBLIP with a Flan-T5 (encoder-decoder) language model is not supported; "
                "the Vicuna/Llama checkpoints are (Salesforce/instructblip-vicuna-7b, -13b)"
            )
        return QFormerProcessor.from_pretrained(
            folder, hf_config.num_query_tokens, hf_config.vision_config.patch_size
        )

    def _layer_counts(self) -> dict[str, int]:
        return {**super()._layer_counts(), "qformer.": self.cfg.connector.n_layers}

    def encode_images(
        self,
        pixel_values: Float[torch.Tensor, "image channel height width"],
        qformer_input_ids: Int[torch.Tensor, "image text_pos"] | None = None,
        qformer_attention_mask: Int[torch.Tensor, "image text_pos"] | None = None,
        **unused: Any,
    ) -> Float[torch.Tensor, "image query d_model"]:
        """Vision tower -> Q-Former (queries reading the image and the instruction) ->
        `language_projection`: the embeddings of the image slots, one image per prompt."""
        if qformer_input_ids is None:
            raise ValueError(
                "InstructBLIP's Q-Former reads the instruction: pass qformer_input_ids (and "
                "qformer_attention_mask) with pixel_values, or inp = model.prepare(image, prompt)"
            )
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        features = self.vision(pixel_values, [-1], "full")
        queries = self.qformer(
            on_device_of(self.qformer, features),
            on_device_of(self.qformer, qformer_input_ids),
            on_device_of(self.qformer, qformer_attention_mask),
        )
        return self.language_projection(on_device_of(self.language_projection, queries))
