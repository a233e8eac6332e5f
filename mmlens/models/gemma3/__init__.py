"""HookedGemma3: Gemma 3 (gemma-3-4b/12b/27b-it) = a SigLIP tower (896 px, 14 px patches,
its post-layernorm) + the pooling projector + the Gemma 3 decoder. HF:
`Gemma3ForConditionalGeneration`.

Projector (`projector.`): the tower's 64 x 64 patch grid average-pooled 4 x 4 to 16 x 16 =
256 tokens (`mm_tokens_per_image`), a Gemma RMSNorm (`mm_soft_emb_norm`, gain 1 + weight),
and the linear map `mm_input_projection_weight` (``[d_vision, d_model]``, no bias). Hooks:
`projector.hook_in` (``[image, patch, d_vision]``), `projector.hook_pooled` (``[image, token,
d_vision]``), `projector.mm_soft_emb_norm.hook_*`, `projector.hook_out` (``[image, token,
d_model]``).

Decoder: token embeddings times sqrt(d_model) (cast to the weights' dtype first, as HF),
sandwich norms (`ln1`, `ln1_post`, `ln2`, `ln2_post`: TransformerLens' Gemma names for HF's
input, post-attention, pre-feedforward and post-feedforward norms), Gemma RMSNorms (1 +
weight, in float32), query/key norms, the query scale ``query_pre_attn_scalar ** -0.5``, a
GELU-tanh gated MLP, interleaved local layers (a sliding window, rotary base 10^4) and global
layers (rotary base 10^6 with the checkpoint's scaling). No logit soft cap: HF's
`Gemma3ForConditionalGeneration` applies neither ``final_logit_softcapping`` nor
``attn_logit_softcapping`` (the released checkpoints set both to null).
Image tokens: each image's 256 tokens attend to each other in both directions (HF's
``token_type_ids`` block mask), within the window on local layers; `attention_groups` gives the
blocks, and masks, pruning, prefix and suffix runs read them by original position.
Pan-and-scan crops (`set_pan_and_scan`): `mmlens.models.gemma3.processor`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import nn

from mmlens.components import RMSNorm
from mmlens.config import MMConfig
from mmlens.hooks import HookPoint
from mmlens.inputs.templates import ConversationTemplate, register_template
from mmlens.models.gemma3.processor import Gemma3InputProcessor
from mmlens.models.llava import HookedLlava, on_device_of
from mmlens.models.registry import register
from mmlens.models.vision import vision_config_from_hf

register_template(  # Gemma 3's chat template: a system text goes before the first user text
    ConversationTemplate(
        name="gemma3",
        pattern="<start_of_turn>user\n{system}{image}{question}<end_of_turn>\n<start_of_turn>model\n",
        default_system="",
        image_slot="{token}",
        last_token="the '\\n' ending '<start_of_turn>model\\n' (the last prompt token)",
        system_slot="{text}\n\n",
    )
)


@dataclass(frozen=True)
class Gemma3ProjectorConfig:
    """The projector's settings: image tokens per image (a square number) and the norm's eps."""

    tokens_per_image: int
    eps: float


class Gemma3Projector(nn.Module):
    """Average pooling of the patch grid, a Gemma RMSNorm, a linear map (HF's
    `Gemma3MultiModalProjector`; parameter names as HF's)."""

    def __init__(self, d_vision: int, d_model: int, grid_size: int, cfg: Gemma3ProjectorConfig):
        super().__init__()
        self.grid_size = grid_size
        self.tokens_per_side = round(cfg.tokens_per_image**0.5)
        if self.tokens_per_side**2 != cfg.tokens_per_image or grid_size % self.tokens_per_side:
            raise ValueError(
                f"mm_tokens_per_image={cfg.tokens_per_image} must be a square whose side divides "
                f"the tower's {grid_size} x {grid_size} patch grid"
            )
        self.pool = grid_size // self.tokens_per_side
        self.mm_input_projection_weight = nn.Parameter(torch.empty(d_vision, d_model))
        self.mm_soft_emb_norm = RMSNorm(d_vision, cfg.eps, unit_offset=True)
        self.hook_in = HookPoint()  # [image, patch, d_vision]
        self.hook_pooled = HookPoint()  # [image, token, d_vision]
        self.hook_out = HookPoint()  # [image, token, d_model]

    def forward(
        self, features: Float[torch.Tensor, "image patch d_vision"]
    ) -> Float[torch.Tensor, "image token d_model"]:
        features = self.hook_in(features)
        grid = einops.rearrange(features, "i (h w) d -> i d h w", h=self.grid_size)
        pooled = F.avg_pool2d(grid, kernel_size=self.pool, stride=self.pool)
        pooled = self.hook_pooled(einops.rearrange(pooled, "i d h w -> i (h w) d"))
        projected = self.mm_soft_emb_norm(pooled) @ self.mm_input_projection_weight
        return self.hook_out(projected.type_as(features))


@register("gemma3")
class HookedGemma3(HookedLlava):
    """Gemma 3 with hooks in the decoder (TransformerLens' Gemma names: `ln1_post`,
    `ln2_post` besides the usual ones), the SigLIP tower (`vision.`, with `vision.ln_post`) and
    the projector (`projector.`). See the module's docstring and docs/checkpoints.md.

    Examples:
        >>> from mmlens.testing import build_tiny_gemma3
        >>> gemma = mmlens.from_pretrained(build_tiny_gemma3("checkpoints/gemma3"))
        >>> gemma.cfg.layer_types[:2], gemma.cfg.layer_window(0), gemma.cfg.layer_window(1)
        (['sliding_attention', 'full_attention'], 24, None)
    """

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        super().__init__(cfg, tokenizer, processor)
        self.default_template = "gemma3"

    weight_prefixes = (
        # Gemma 3 reads SigLIP's last hidden state, which passes the tower's post-layernorm.
        (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?post_layernorm\.", "vision.ln_post."),
    )
    weight_renames = (
        (r"^lm\.layers\.(\d+)\.post_attention_layernorm\.", r"blocks.\1.ln1_post."),
        (r"^lm\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"blocks.\1.ln2."),
        (r"^lm\.layers\.(\d+)\.post_feedforward_layernorm\.", r"blocks.\1.ln2_post."),
    )

    @property
    def token_patch_size(self) -> int:
        """The side, in processed pixels, of one image token's cell: a pooled block of
        tower patches (4 x 4 of 14 px = 56 px at 896 px)."""
        return self.cfg.vision.patch_size * self.projector.pool

    def build_connector(self, cfg: MMConfig) -> None:
        """Gemma 3's pooling projector."""
        self.projector = Gemma3Projector(
            cfg.vision.d_model, cfg.d_model, cfg.vision.grid_size, cfg.connector
        )

    @classmethod
    def config_from_hf(cls, hf_config: Any, **overrides: Any) -> MMConfig:
        """The Gemma 3 decoder's fields (read here: `MMConfig.from_hf` reads Llama-style
        decoders), the SigLIP tower with its post-layernorm, the projector's settings."""
        text = hf_config.text_config
        # `final_logit_softcapping` and `attn_logit_softcapping` are read by neither HF's
        # Gemma3ForConditionalGeneration (only its text-only Gemma3ForCausalLM caps logits)
        # nor its attention (the cap is never passed on); the released checkpoints set both to
        # null. mmlens follows HF's multimodal model: no cap (docs/checkpoints.md).
        if getattr(text, "use_bidirectional_attention", False):
            raise NotImplementedError(
                "use_bidirectional_attention=True (an encoder use of Gemma 3) is not supported"
            )
        vision = dataclasses.replace(
            vision_config_from_hf(hf_config.vision_config), has_ln_post=True
        )
        layer_rope = {kind: dict(params) for kind, params in text.rope_parameters.items()}
        fields: dict[str, Any] = dict(
            n_layers=text.num_hidden_layers,
            d_model=text.hidden_size,
            n_heads=text.num_attention_heads,
            n_key_value_heads=text.num_key_value_heads,
            d_head=text.head_dim,
            d_mlp=text.intermediate_size,
            d_vocab=text.vocab_size,
            eps=text.rms_norm_eps,
            act_fn=text.hidden_activation,
            rope_parameters=layer_rope["full_attention"],
            layer_rope_parameters=layer_rope,
            layer_types=list(text.layer_types),
            sliding_window=text.sliding_window,
            attn_scale=text.query_pre_attn_scalar**-0.5,  # HF's expression, bit for bit
            norm_unit_offset=True,
            sandwich_norms=True,
            embed_scale=text.hidden_size**0.5,
            qk_norm=True,
            attention_bias=text.attention_bias,
            max_position_embeddings=text.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            pad_token_id=text.pad_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            model_type=hf_config.model_type,
            decoder_model_type=text.model_type,
            model_name=getattr(hf_config, "name_or_path", "") or hf_config.model_type,
            vision=vision,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_token_id=hf_config.image_token_id,
            connector=Gemma3ProjectorConfig(
                hf_config.mm_tokens_per_image, hf_config.vision_config.layer_norm_eps
            ),
        )
        fields.update(overrides)
        return MMConfig(**fields)

    def set_pan_and_scan(self, enabled: bool = True, **settings: Any) -> None:
        """Turn pan-and-scan crops on (or off) for the inputs `prepare` makes from now on
        (HF's ``do_pan_and_scan``; the released processors have it off); `settings` are HF's
        ``pan_and_scan_min_crop_size`` (256), ``pan_and_scan_max_num_crops`` (4),
        ``pan_and_scan_min_ratio_to_activate`` (1.2). Inputs prepared before are then refused:
        their processor differs.

        Examples:
            >>> from mmlens.testing import build_tiny_gemma3
            >>> gemma = mmlens.from_pretrained(build_tiny_gemma3("checkpoints/gemma3"))
            >>> gemma.set_pan_and_scan(pan_and_scan_min_crop_size=64)
            >>> from PIL import Image
            >>> inp = gemma.prepare(Image.new("RGB", (600, 200)), "What is it?")
            >>> inp.image_geometry[0].n_crops, len(inp.positions("image"))  # the image, 3 crops
            (4, 64)
        """
        self.processor = self.processor.with_pan_and_scan(enabled, **settings)

    @classmethod
    def load_processor(cls, folder: Path, hf_config: Any) -> Gemma3InputProcessor:
        """`Gemma3InputProcessor` from the folder's image processor settings and tokenizer."""
        return Gemma3InputProcessor.from_pretrained(folder, hf_config)

    def encode_images(
        self, pixel_values: Float[torch.Tensor, "image channel height width"], **unused: Any
    ) -> Float[torch.Tensor, "image token d_model"]:
        """SigLIP's last layer after its post-layernorm -> the pooling projector."""
        features = self.vision(pixel_values, [-1], "full")
        return self.projector(on_device_of(self.projector, features))

    def attention_groups(
        self, input_ids: Int[torch.Tensor, "batch pos"] | None = None, **inputs: Any
    ) -> Int[torch.Tensor, "batch pos"] | None:
        """Each run of consecutive image tokens (one image) is a group whose tokens attend to
        each other in both directions, as HF's ``token_type_ids`` mask during the prompt;
        every other position -1.

        Examples:
            >>> from types import SimpleNamespace
            >>> gemma = SimpleNamespace(cfg=SimpleNamespace(image_token_id=9))  # 9: image tokens
            >>> HookedGemma3.attention_groups(gemma, torch.tensor([[2, 9, 9, 3, 9, 9]]))
            tensor([[-1,  0,  0, -1,  1,  1]])
        """
        if input_ids is None:
            return None
        is_image = input_ids == self.cfg.image_token_id
        previous = F.pad(is_image, (1, 0), value=False)[:, :-1]
        group = (is_image & ~previous).long().cumsum(-1) - 1
        return torch.where(is_image, group, -1)
