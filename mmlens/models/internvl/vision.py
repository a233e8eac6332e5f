"""InternVL's vision side: InternViT (a ViT with layer scale, optional QK-norm and LayerNorm or
RMSNorm) with TransformerLens hook names under `vision.`, and the connector: pixel shuffle
(each 2 x 2 block of patches concatenated into one token) then an MLP (LayerNorm, Linear, GELU,
Linear) under `projector.`.

HF: `InternVLVisionModel` and `InternVLMultiModalProjector` / `InternVLModel.pixel_shuffle`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import nn
from transformers.activations import ACT2FN

from mmlens.components import MLP, Attention, LayerNorm, RMSNorm, TransformerBlock
from mmlens.config import VisionConfig
from mmlens.hooks import HookPoint
from mmlens.models.vision import HookedVisionTower, PatchEmbed


@dataclass
class InternVLConnectorConfig:
    """What InternVL has beyond a `VisionConfig` and the decoder (it is `cfg.connector`).

    Attributes:
        downsample_ratio: the pixel shuffle's ratio (0.5: 2 x 2 patches per image token).
        norm_type: InternViT's block norms, ``"layer_norm"`` or ``"rms_norm"``.
        qk_norm: an RMSNorm over all heads' queries (and keys) in each InternViT block.
        attention_bias: biases on InternViT's query, key and value projections.
        d_out: the decoder's width (the projector's output).
        projector_act: the projector's activation.
    """

    downsample_ratio: float = 0.5
    norm_type: str = "layer_norm"
    qk_norm: bool = False
    attention_bias: bool = True
    d_out: int = 0
    projector_act: str = "gelu"
    template: str = "internvl"
    """The conversation `prepare` uses: the -hf chat template, or an original release's."""
    column_major_tokens: bool = False
    """Each crop's tokens column by column (an original release's ``ps_version: v1``)."""

    @property
    def merge_size(self) -> int:
        """Patches per side of one image token (2 for ratio 0.5)."""
        merge = round(1 / self.downsample_ratio)
        if abs(merge * self.downsample_ratio - 1) > 1e-9:
            raise NotImplementedError(
                f"downsample_ratio={self.downsample_ratio}: only 1 / n ratios (0.5) are supported"
            )
        return merge


class LayerScaleBlock(TransformerBlock):
    """A pre-norm block whose attention and MLP outputs are scaled per channel by learned
    `lambda_1` and `lambda_2` (layer scale) before they join the residual stream.
    `hook_attn_out` and `hook_mlp_out` hold the scaled outputs: what is added to the stream."""

    def __init__(self, ln1: nn.Module, attn: Attention, ln2: nn.Module, mlp: nn.Module, d: int):
        super().__init__(ln1, attn, ln2, mlp)
        self.lambda_1 = nn.Parameter(torch.ones(d))
        self.lambda_2 = nn.Parameter(torch.ones(d))

    def forward(
        self, resid: Float[torch.Tensor, "crop pos d"], query_index: Any = None, **attn_kwargs: Any
    ) -> tuple[Float[torch.Tensor, "crop pos d"], Any]:
        resid = self.hook_resid_pre(resid)
        attn_out, key_value = self.attn(self.ln1(resid), **attn_kwargs)
        resid = self.hook_resid_mid(resid + self.hook_attn_out(self.lambda_1 * attn_out))
        mlp_out = self.lambda_2 * self.mlp(self.ln2(resid))
        return self.hook_resid_post(resid + self.hook_mlp_out(mlp_out)), key_value


class HookedInternViT(HookedVisionTower):
    """InternViT: class token, learned positions, blocks with layer scale (LayerNorm or
    RMSNorm; QK-norm over all heads where the config has it), and, where the checkpoint does not
    mean-pool (``use_mean_pooling=False``), a final LayerNorm on the last layer's output
    (`ln_post`). Hooks as `HookedVisionTower`'s (no `ln_pre`): `hook_embed`, `blocks.{l}.*`,
    `ln_post.*`, `hook_features` (``[crop, patch, d_vision]``, class token dropped)."""

    def __init__(self, cfg: VisionConfig, extras: InternVLConnectorConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embed = PatchEmbed(cfg)
        self.hook_embed = HookPoint()
        self.ln_pre = nn.Identity()

        def norm() -> nn.Module:
            if extras.norm_type == "layer_norm":
                return LayerNorm(cfg.d_model, cfg.eps)
            if extras.norm_type == "rms_norm":
                return RMSNorm(cfg.d_model, cfg.eps)
            raise NotImplementedError(
                f"InternViT norm_type={extras.norm_type!r}: 'layer_norm' or 'rms_norm'"
            )

        self.blocks = nn.ModuleList(
            LayerScaleBlock(
                norm(),
                Attention(
                    cfg.d_model,
                    cfg.n_heads,
                    cfg.n_heads,
                    cfg.d_head,
                    bias=extras.attention_bias,
                    rotary=False,
                    output_bias=True,
                    # HF's InternVLVisionRMSNorm default eps, over the whole width
                    qk_norm_eps=1e-6 if extras.qk_norm else None,
                    qk_norm_per_head=False,
                ),
                norm(),
                MLP(cfg.d_model, cfg.d_mlp, cfg.act_fn),
                cfg.d_model,
            )
            for _ in range(cfg.n_layers)
        )
        if cfg.has_ln_post:
            self.ln_post = LayerNorm(cfg.d_model, cfg.eps)
        self.hook_features = HookPoint()


def pixel_shuffle(
    features: Float[torch.Tensor, "crop rows cols d"], merge: int, column_major: bool = False
) -> Float[torch.Tensor, "crop token_rows token_cols merged_d"]:
    """Each `merge` x `merge` block of patches concatenated into one token: token (i, j) holds
    patches (2i, 2j), (2i, 2j + 1), (2i + 1, 2j), (2i + 1, 2j + 1) in that order (for 2), as
    HF's `InternVLModel.pixel_shuffle` (the original's ``ps_version="v2"``) orders them. With
    `column_major` (the original's ``"v1"``, which skips v2's last transpose) the grid comes
    transposed, ``[crop, token_cols, token_rows, merged_d]``: flattened, tokens go column by
    column, each packed as in v2.

    >>> grid = torch.arange(16.0).reshape(1, 4, 4, 1)
    >>> pixel_shuffle(grid, 2)[0, 0, 1].tolist()
    [2.0, 3.0, 6.0, 7.0]
    >>> pixel_shuffle(grid, 2, column_major=True)[0, 1, 0].tolist()
    [2.0, 3.0, 6.0, 7.0]
    """
    order = "n j i (di dj d)" if column_major else "n i j (di dj d)"
    return einops.rearrange(features, f"n (i di) (j dj) d -> {order}", di=merge, dj=merge)


class PixelShuffleProjector(nn.Module):
    """Pixel shuffle, then ``linear_2(act(linear_1(layer_norm(x))))``.

    Hooks: `hook_in` (``[crop, token, merge**2 * d_vision]``, the shuffled features) and
    `hook_out` (``[crop, token, d_model]``).
    """

    def __init__(self, cfg: VisionConfig, extras: InternVLConnectorConfig):
        super().__init__()
        self.merge = extras.merge_size
        self.column_major = extras.column_major_tokens
        d_in = cfg.d_model * self.merge**2
        self.layer_norm = nn.LayerNorm(d_in, eps=1e-5)  # HF's default eps
        self.linear_1 = nn.Linear(d_in, extras.d_out)
        self.act = ACT2FN[extras.projector_act]
        self.linear_2 = nn.Linear(extras.d_out, extras.d_out)
        self.hook_in = HookPoint()
        self.hook_out = HookPoint()

    def forward(
        self, features: Float[torch.Tensor, "crop patch d_vision"]
    ) -> Float[torch.Tensor, "crop token d_model"]:
        side = round(features.shape[1] ** 0.5)
        if side * side != features.shape[1] or side % self.merge:
            raise ValueError(
                f"{features.shape[1]} patches per crop: InternVL shuffles a square grid whose "
                f"side is a multiple of {self.merge}"
            )
        grid = einops.rearrange(features, "n (rows cols) d -> n rows cols d", rows=side)
        shuffled = pixel_shuffle(grid, self.merge, self.column_major).flatten(1, 2)
        shuffled = self.hook_in(shuffled)
        return self.hook_out(self.linear_2(self.act(self.linear_1(self.layer_norm(shuffled)))))
