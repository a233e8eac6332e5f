"""One config for the decoder, the vision tower, the projector and the multimodal glue.

Field names follow TransformerLens (`n_layers`, `d_model`, ...) so that
`transformer_lens.ActivationCache` helpers work unchanged; `from_hf` reads a Hugging Face
config (a decoder's, or a vision-language model's with `text_config`); a family's
`config_from_hf` adds its vision tower and connector (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VisionConfig:
    """A ViT vision tower with learned absolute positions. What differs between the HF tower
    types (a class token, a layernorm before the first block or after the last, a bias on the
    patch convolution, the MLP's activation) is a field; `mmlens.models.vision.TOWER_TYPES`
    sets them for each HF vision `model_type`."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    image_size: int
    patch_size: int
    eps: float = 1e-5
    act_fn: str = "quick_gelu"
    n_channels: int = 3
    kind: str = "clip"  # the tower type's short name (`TOWER_TYPES`), for messages and tests
    has_cls: bool = True
    """Whether token 0 is a class token rather than the first patch."""
    has_ln_pre: bool = True
    """Whether a layernorm precedes the first block."""
    has_ln_post: bool = False
    """Whether the output features pass the tower's final layernorm."""
    conv_bias: bool = False
    """Whether the patch convolution has a bias."""
    n_positions: int | None = None
    """Rows of the learned position table; None: one per token (the patches, and the class
    token). A square table of another size is resized bicubically to the patch grid
    (`mmlens.models.vision.resize_positions`; e.g. a 16 x 16 table for 32 x 32 patches)."""

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) input image."""
        return self.image_size // self.patch_size


@dataclass
class MMConfig:
    """Config of a decoder-only LM, optionally with a vision tower and projector (LLaVA)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_key_value_heads: int | None = None
    d_head: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    rope_parameters: dict = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 1e4}
    )
    max_position_embeddings: int = 4096
    rotary_limit: int | None = None
    """Positions from here on are refused (`HookedTransformer.position_ids`): the checkpoint's
    rotary embedding changes there in a way mmlens does not implement (dynamic scaling, NTK);
    `rotary_limit_reason` says how, in the error. None: no limit."""
    rotary_limit_reason: str = ""
    attention_bias: bool = False  # every attention projection (Llama's attention_bias)
    qkv_bias: bool = False  # query, key and value projections only (a Qwen2 decoder)
    qk_norm: bool = False  # an RMSNorm over each head's query and key (a Qwen3 decoder)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    """Per layer, HF's ``"sliding_attention"`` or ``"full_attention"``: `sliding_window`
    applies to the first kind only (interleaved local and global layers); None:
    every layer alike (`sliding_window`, if set, everywhere)."""
    layer_rope_parameters: dict[str, dict] | None = None
    """Rotary parameters per layer type (keys of `layer_types`), where they differ (e.g. a
    local base 10^4 and global base 10^6 with its scaling); None: `rope_parameters` for all."""
    attn_scale: float | None = None
    """The query-key scale (HF's ``query_pre_attn_scalar ** -0.5``); None: d_head ** -0.5."""
    norm_unit_offset: bool = False
    """RMSNorm gains are ``1 + weight``, applied in float32."""
    sandwich_norms: bool = False
    """Each block norms its attention and MLP outputs too (`ln1_post`, `ln2_post`)."""
    embed_scale: float | None = None
    """Token embeddings are multiplied by this (e.g. sqrt(d_model)); None: not scaled."""
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_name: str = "custom"
    model_type: str = "llama"
    decoder_model_type: str = (
        "llama"  # the decoder's HF model_type (some families pick a template by it)
    )
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    # Multimodal (LLaVA) fields; `vision is None` for a text-only model.
    vision: VisionConfig | None = None
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str | None = "gelu"  # None: one linear layer (LLaVA v0)
    projector_bias: bool = True
    image_token_id: int | None = None
    # Tiling families: candidate canvas sizes [height, width] for the tiles; None: one crop.
    image_grid_pinpoints: list[list[int]] | None = None
    # "anyres_max_N": tile grids above N tiles' worth of patches are downsampled; None: never.
    vision_aspect_ratio: str | None = None
    # The connector's own config where it is more than a projector (learned queries), else None.
    connector: Any = None
    # Fixed for this architecture family; read by transformer_lens.ActivationCache.
    normalization_type: str = "RMS"
    attn_only: bool = False
    positional_embedding_type: str = "rotary"

    def __post_init__(self) -> None:
        if self.layer_types is not None and len(self.layer_types) != self.n_layers:
            raise ValueError(
                f"layer_types names {len(self.layer_types)} layers; the decoder has {self.n_layers}"
            )
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.d_head is None:
            self.d_head = self.d_model // self.n_heads
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_key_value_heads="
                f"{self.n_key_value_heads}"
            )

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer` (None: it attends to every earlier
        position).

        >>> cfg = MMConfig(2, 8, 2, 16, 10, sliding_window=4,
        ...                layer_types=["sliding_attention", "full_attention"])
        >>> cfg.layer_window(0), cfg.layer_window(1)
        (4, None)
        """
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> dict:
        """The rotary parameters of decoder layer `layer`."""
        if self.layer_rope_parameters is None or self.layer_types is None:
            return self.rope_parameters
        return self.layer_rope_parameters[self.layer_types[layer]]

    @property
    def vision_feature_layers(self) -> list[int]:
        """`vision_feature_layer` as a list (HF allows an int or a list)."""
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> MMConfig:
        """Build from a HF config: a text config, or a vision-language config with
        `text_config` (its LLaVA-style multimodal fields read where present). `overrides` set
        any field; a family's `config_from_hf` passes its `vision` (and `connector`) here."""
        text = getattr(hf, "text_config", None) or hf
        if text.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            raise NotImplementedError(
                f"decoder of type {text.model_type!r} is not supported (llama, mistral, qwen2, "
                "qwen3)"
            )
        if getattr(text, "hidden_act", "silu") != "silu":
            raise NotImplementedError(f"decoder activation {text.hidden_act!r} (silu only)")
        fields: dict[str, Any] = dict(
            n_layers=text.num_hidden_layers,
            d_model=text.hidden_size,
            n_heads=text.num_attention_heads,
            n_key_value_heads=text.num_key_value_heads,
            d_head=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            d_mlp=text.intermediate_size,
            d_vocab=text.vocab_size,
            eps=text.rms_norm_eps,
            rope_parameters=dict(text.rope_parameters),
            max_position_embeddings=text.max_position_embeddings,
            attention_bias=getattr(text, "attention_bias", False),
            mlp_bias=getattr(text, "mlp_bias", False),
            tie_word_embeddings=bool(
                getattr(hf, "tie_word_embeddings", False)
                or getattr(text, "tie_word_embeddings", False)
            ),
            qkv_bias=text.model_type == "qwen2",
            qk_norm=text.model_type == "qwen3",
            # Qwen2 configs name a window even when use_sliding_window is off (and then none is
            # used); Mistral's is used whenever it is set.
            sliding_window=getattr(text, "sliding_window", None)
            if getattr(text, "use_sliding_window", True)
            else None,
            pad_token_id=text.pad_token_id,
            bos_token_id=text.bos_token_id,
            eos_token_id=text.eos_token_id,
            model_type=hf.model_type,
            decoder_model_type=text.model_type,
            model_name=getattr(hf, "name_or_path", "") or hf.model_type,
        )
        if hasattr(hf, "vision_config"):  # the multimodal fields a LLaVA-style config names
            fields.update(
                vision_feature_layer=getattr(hf, "vision_feature_layer", -2),
                vision_feature_select_strategy=getattr(
                    hf, "vision_feature_select_strategy", "default"
                ),
                # One linear layer where a release format's config says so (LLaVA v0).
                projector_hidden_act=getattr(hf, "projector_hidden_act", "gelu")
                if getattr(hf, "projector_layers", 2) == 2
                else None,
                projector_bias=getattr(hf, "multimodal_projector_bias", True),
                image_token_id=getattr(hf, "image_token_id", None),
                image_grid_pinpoints=getattr(hf, "image_grid_pinpoints", None),
                vision_aspect_ratio=getattr(hf, "vision_aspect_ratio", None),
            )
        fields.update(overrides)
        return cls(**fields)
