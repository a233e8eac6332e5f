"""HookedVisionTower: a CLIP, SigLIP or BLIP-2 ViT with TransformerLens hook names under
`vision.`; `TOWER_TYPES` reads each HF vision config into a `VisionConfig`."""

from __future__ import annotations

import math
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import nn

from mmlens.components import MLP, Attention, LayerNorm, TransformerBlock
from mmlens.config import VisionConfig
from mmlens.hooks import HookPoint

TOWER_TYPES: dict[str, dict[str, Any]] = {
    # CLIP: class token, pre-layernorm, quick-gelu MLP.
    "clip_vision_model": dict(kind="clip"),
    "clip": dict(kind="clip"),
    # SigLIP: no class token, no pre-layernorm, biased patch convolution, tanh-gelu MLP.
    "siglip_vision_model": dict(kind="siglip", has_cls=False, has_ln_pre=False, conv_bias=True),
    # BLIP-2's EVA ViT (InstructBLIP): class token, no pre-layernorm, biased patch convolution,
    # a post-layernorm on the output features (what the Q-Former reads), gelu MLP.
    "instructblip_vision_model": dict(
        kind="blip", has_ln_pre=False, has_ln_post=True, conv_bias=True
    ),
}
"""HF vision `model_type` -> the `VisionConfig` fields that tell its architecture apart."""


def vision_config_from_hf(hf: Any) -> VisionConfig:
    """The `VisionConfig` of a HF vision tower config (`TOWER_TYPES` names the supported ones).

    >>> from transformers import CLIPVisionConfig
    >>> vision_config_from_hf(CLIPVisionConfig(image_size=112, patch_size=14)).grid_size
    8
    """
    if hf.model_type not in TOWER_TYPES:
        raise NotImplementedError(
            f"vision tower of type {hf.model_type!r} is not supported yet; supported: "
            f"{sorted(TOWER_TYPES)}"
        )
    return VisionConfig(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        eps=hf.layer_norm_eps,
        act_fn=hf.hidden_act,
        n_channels=getattr(hf, "num_channels", 3),
        **TOWER_TYPES[hf.model_type],
    )


def resize_positions(
    table: Float[torch.Tensor, "n_positions d"], n_target: int
) -> Float[torch.Tensor, "n_target d"]:
    """A square grid of learned positions (row-major) resized bicubically to a square grid of
    `n_target` cells, in float32 (Qwen-VL's ``get_abs_pos``); the table itself where the sizes
    agree.

    >>> resize_positions(torch.randn(16, 8), 64).shape
    torch.Size([64, 8])
    """
    side, target_side = math.isqrt(table.shape[0]), math.isqrt(n_target)
    if side == target_side:
        return table
    if side**2 != table.shape[0] or target_side**2 != n_target:
        raise ValueError(
            f"cannot resize {table.shape[0]} positions to {n_target}: both must be square grids"
        )
    grid = einops.rearrange(table.float(), "(h w) d -> 1 d h w", h=side)
    resized = F.interpolate(
        grid, size=(target_side, target_side), mode="bicubic", align_corners=False
    )
    return einops.rearrange(resized, "1 d h w -> (h w) d").to(table.dtype)


class PatchEmbed(nn.Module):
    """Patch convolution + learned absolute positions, after a class token for CLIP and BLIP
    (SigLIP has none; SigLIP and BLIP have a bias on the convolution). A position table of
    another size than the patch grid (`VisionConfig.n_positions`, no class token) is resized
    to it (`resize_positions`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            cfg.n_channels,
            cfg.d_model,
            kernel_size=cfg.patch_size,
            stride=cfg.patch_size,
            bias=cfg.conv_bias,
        )
        if cfg.has_cls:
            self.class_embedding = nn.Parameter(torch.empty(cfg.d_model))
        n_positions = cfg.n_positions or cfg.grid_size**2 + cfg.has_cls
        self.position_embedding = nn.Embedding(n_positions, cfg.d_model)

    def forward(
        self, pixel_values: Float[torch.Tensor, "image channel height width"]
    ) -> Float[torch.Tensor, "image token d_vision"]:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # row-major over the patch grid
        if hasattr(self, "class_embedding"):
            cls = self.class_embedding.expand(patches.shape[0], 1, -1)
            patches = torch.cat((cls, patches), dim=1)
        positions = self.position_embedding.weight
        if positions.shape[0] != patches.shape[1]:
            positions = resize_positions(positions, patches.shape[1])
        return patches + positions


class HookedVisionTower(nn.Module):
    """CLIP, SigLIP or BLIP vision encoder. CLIP and BLIP: token 0 is CLS, tokens 1.. are
    patches in row-major order; SigLIP: every token is a patch, row-major.

    Hooks: `hook_embed`, `ln_pre.*` (CLIP only), `blocks.{l}.*` (decoder names, LayerNorm, no
    rotary), `ln_post.*` (BLIP only: the last layer's output normed, what the Q-Former reads),
    `hook_features` (the selected layers' features that go to the projector or Q-Former).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = PatchEmbed(cfg)
        self.hook_embed = HookPoint()
        self.ln_pre = LayerNorm(cfg.d_model, cfg.eps) if cfg.has_ln_pre else nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(
                LayerNorm(cfg.d_model, cfg.eps),
                Attention(
                    cfg.d_model, cfg.n_heads, cfg.n_heads, cfg.d_head, bias=True, rotary=False
                ),
                LayerNorm(cfg.d_model, cfg.eps),
                MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn),
            )
            for _ in range(cfg.n_layers)
        )
        if cfg.has_ln_post:
            self.ln_post = LayerNorm(cfg.d_model, cfg.eps)
        self.hook_features = HookPoint()

    def forward(
        self,
        pixel_values: Float[torch.Tensor, "image channel height width"],
        feature_layers: list[int],
        select_strategy: str,
    ) -> Float[torch.Tensor, "image token d_features"]:
        """Features of `feature_layers`, concatenated on the channel axis.

        Layer indices follow HF's `hidden_states`: 0 is the pre-layernorm output, `l` the output
        of block `l - 1`, negative indices count from the end (-1 = last block). Blocks after the
        last selected one cannot affect the features and are not run (their hooks do not fire).
        `select_strategy="default"` drops the CLS token, `"full"` keeps it (SigLIP has none:
        "default" would drop a patch, so both keep every token, as HF's LLaVA-OneVision does).
        """
        n_states = self.cfg.n_layers + 1
        for layer in feature_layers:
            if not -n_states <= layer < n_states:
                raise ValueError(
                    f"vision_feature_layer {layer} is out of range for {self.cfg.n_layers} layers"
                )
        state_indices = [layer % n_states for layer in feature_layers]
        resid = self.ln_pre(self.hook_embed(self.embed(pixel_values)))
        states = [resid]
        for block in self.blocks[: max(state_indices)]:
            resid, _ = block(resid)
            states.append(resid)
        if self.cfg.has_ln_post:
            if state_indices != [self.cfg.n_layers]:
                raise ValueError(
                    f"vision_feature_layer {feature_layers}: a BLIP tower's features are its "
                    "last layer after the final layernorm (-1)"
                )
            states[-1] = self.ln_post(states[-1])
        features = torch.cat([states[index] for index in state_indices], dim=-1)
        if select_strategy == "default" and self.cfg.has_cls:
            features = features[:, 1:]
        elif select_strategy != "full":
            raise ValueError(
                f"vision_feature_select_strategy {select_strategy!r}: use 'default' or 'full'"
            )
        return self.hook_features(features)
