"""One config for the decoder, the vision tower, the projector and the multimodal glue.

Field names follow TransformerLens (`n_layers`, `d_model`, ...) so that
`transformer_lens.ActivationCache` helpers work unchanged; `from_hf` reads a Hugging Face
config (`LlamaConfig`, `MistralConfig`, `LlavaConfig`, `LlavaNextConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class VisionConfig:
    """A ViT vision tower: CLIP (class token, pre-layernorm, quick-gelu MLP), SigLIP (no class
    token, no pre-layernorm, biased patch convolution, tanh-gelu MLP) or BLIP-2's EVA ViT
    (class token, biased patch convolution, no pre-layernorm, a post-layernorm on the output
    features, gelu MLP); learned absolute positions for all."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    image_size: int
    patch_size: int
    eps: float = 1e-5
    act_fn: str = "quick_gelu"
    n_channels: int = 3
    kind: str = "clip"  # "clip", "siglip" or "blip"

    @property
    def has_cls(self) -> bool:
        """Whether token 0 is a class token (CLIP, BLIP) rather than the first patch (SigLIP)."""
        return self.kind in ("clip", "blip")

    @property
    def has_ln_pre(self) -> bool:
        """Whether a layernorm precedes the first block (CLIP's `pre_layrnorm`)."""
        return self.kind == "clip"

    @property
    def has_ln_post(self) -> bool:
        """Whether the output features pass the tower's final layernorm (BLIP: the Q-Former
        reads the post-layernormed last layer)."""
        return self.kind == "blip"

    @property
    def conv_bias(self) -> bool:
        """Whether the patch convolution has a bias (SigLIP, BLIP; not CLIP)."""
        return self.kind != "clip"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of the (square) input image."""
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf: Any) -> VisionConfig:
        kinds = {
            "clip_vision_model": "clip",
            "clip": "clip",
            "siglip_vision_model": "siglip",
            "instructblip_vision_model": "blip",
        }
        if hf.model_type not in kinds:
            raise NotImplementedError(
                f"vision tower of type {hf.model_type!r} is not supported yet (CLIP, SigLIP, "
                "InstructBLIP's)"
            )
        return cls(
            n_layers=hf.num_hidden_layers,
            d_model=hf.hidden_size,
            n_heads=hf.num_attention_heads,
            d_mlp=hf.intermediate_size,
            image_size=hf.image_size,
            patch_size=hf.patch_size,
            eps=hf.layer_norm_eps,
            act_fn=hf.hidden_act,
            n_channels=getattr(hf, "num_channels", 3),
            kind=kinds[hf.model_type],
        )


@dataclass
class QFormerConfig:
    """InstructBLIP's Q-Former: a BERT encoder (post-layernorm blocks) over learned query tokens
    followed by the instruction's tokens; every `cross_attention_frequency`-th block (0, f, 2f,
    ...) lets the queries attend to the vision tower's features (`d_encoder` wide); queries and
    text have separate MLPs."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    d_vocab: int
    n_positions: int
    d_encoder: int
    n_query_tokens: int
    cross_attention_frequency: int = 2
    eps: float = 1e-12
    act_fn: str = "gelu"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0

    @classmethod
    def from_hf(cls, hf: Any, n_query_tokens: int) -> QFormerConfig:
        return cls(
            n_layers=hf.num_hidden_layers,
            d_model=hf.hidden_size,
            n_heads=hf.num_attention_heads,
            d_mlp=hf.intermediate_size,
            d_vocab=hf.vocab_size,
            n_positions=hf.max_position_embeddings,
            d_encoder=hf.encoder_hidden_size,
            n_query_tokens=n_query_tokens,
            cross_attention_frequency=hf.cross_attention_frequency,
            eps=hf.layer_norm_eps,
            act_fn=hf.hidden_act,
        )


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
    attention_bias: bool = False  # every attention projection (Llama's attention_bias)
    qkv_bias: bool = False  # query, key and value projections only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_name: str = "custom"
    model_type: str = "llama"
    decoder_model_type: str = "llama"  # the decoder's HF model_type (LLaVA-NeXT picks its template)
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    # Multimodal (LLaVA) fields; `vision is None` for a text-only model.
    vision: VisionConfig | None = None
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_token_id: int | None = None
    # LLaVA-NeXT ("anyres"): candidate canvas sizes [height, width] for the tiles; None for LLaVA-1.5.
    image_grid_pinpoints: list[list[int]] | None = None
    # LLaVA-OneVision: "anyres_max_N" (tile grids above N tiles' worth of patches are
    # downsampled); None for LLaVA-1.5 and LLaVA-NeXT.
    vision_aspect_ratio: str | None = None
    # InstructBLIP: the Q-Former between the vision tower and the decoder; None for LLaVA.
    qformer: QFormerConfig | None = None
    # Fixed for this architecture family; read by transformer_lens.ActivationCache.
    normalization_type: str = "RMS"
    attn_only: bool = False
    positional_embedding_type: str = "rotary"

    def __post_init__(self) -> None:
        if self.n_key_value_heads is None:
            self.n_key_value_heads = self.n_heads
        if self.d_head is None:
            self.d_head = self.d_model // self.n_heads
        if self.n_heads % self.n_key_value_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_key_value_heads="
                f"{self.n_key_value_heads}"
            )

    @property
    def vision_feature_layers(self) -> list[int]:
        """`vision_feature_layer` as a list (HF allows an int or a list)."""
        layers = self.vision_feature_layer
        return [layers] if isinstance(layers, int) else list(layers)

    @classmethod
    def from_hf(cls, hf: Any, **overrides: Any) -> MMConfig:
        """Build from a HF config: a text config, or a LLaVA config with `text_config`."""
        text = getattr(hf, "text_config", None) or hf
        if text.model_type not in ("llama", "mistral", "qwen2"):
            raise NotImplementedError(
                f"decoder of type {text.model_type!r} is not supported (llama, mistral, qwen2)"
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
        if hasattr(hf, "qformer_config"):  # InstructBLIP: the Q-Former reads the last layer
            fields.update(
                vision=VisionConfig.from_hf(hf.vision_config),
                vision_feature_layer=-1,
                vision_feature_select_strategy="full",
                image_token_id=hf.image_token_id,
                qformer=QFormerConfig.from_hf(hf.qformer_config, hf.num_query_tokens),
            )
        elif hasattr(hf, "vision_config"):
            fields.update(
                vision=VisionConfig.from_hf(hf.vision_config),
                vision_feature_layer=hf.vision_feature_layer,
                vision_feature_select_strategy=hf.vision_feature_select_strategy,
                projector_hidden_act=hf.projector_hidden_act,
                projector_bias=getattr(hf, "multimodal_projector_bias", True),
                image_token_id=hf.image_token_id,
                image_grid_pinpoints=getattr(hf, "image_grid_pinpoints", None),
                vision_aspect_ratio=getattr(hf, "vision_aspect_ratio", None),
            )
        fields.update(overrides)
        return cls(**fields)
