"""HookedQwen3VL: Qwen3-VL = Qwen2-VL's design (`mmlens.models.qwen2_vl`: the image processor
and its rows of flattened patches, the 2 x 2 merger, the tower's 2-D rotary, the 3-D position
ids of the prompt) with a tower of learned interpolated positions, DeepStack, a Qwen3 decoder
(an RMSNorm over each head's query and key, `attn.q_norm` / `attn.k_norm`) and interleaved
M-RoPE.

DeepStack: the outputs of a few tower blocks (``deepstack_visual_indexes``), each through its
own merger (`vision.deepstack_mergers.{k}`), are added to the residual stream at the image
tokens after decoder block k, for the first ``len(deepstack_visual_indexes)`` blocks. The
addition is `blocks.{k}.hook_deepstack` (``[batch, pos, d_model]``, zero at every other
position): `blocks.{k}.hook_resid_post` is the block's output before it, and
`blocks.{k+1}.hook_resid_pre` = `blocks.{k}.hook_resid_post` + `blocks.{k}.hook_deepstack`.
Each row gets the vector of its original position, so pruning, prefix and suffix runs and the
KV cache keep it where it belongs.

Interleaved M-RoPE: the rotary frequencies turn by time, row, column, time, row, column, ...
(`mrope_section` gives how many turn by rows and columns; the rest by time), not in three
consecutive sections. Videos are not supported. HF: `Qwen3VLForConditionalGeneration`.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int

from mmlens.components import RotaryEmbedding
from mmlens.config import MMConfig, VisionConfig
from mmlens.hooks import HookPoint
from mmlens.inputs.templates import ConversationTemplate, register_template
from mmlens.models.llava import on_device_of
from mmlens.models.prefix import _Rows
from mmlens.models.qwen2_vl import HookedQwen2VL, qwen_extras_fields, qwen_vision_config
from mmlens.models.qwen3_vl.vision import HookedQwen3VLVision, Qwen3VLMerger, Qwen3VLVisionExtras
from mmlens.models.registry import register
from mmlens.sequence import LayerKV

register_template(  # Qwen3-VL's chat template: ChatML without a default system turn
    ConversationTemplate(
        name="qwen3_vl",
        pattern="{system}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
        default_system="",
        image_slot="<|vision_start|>{token}<|vision_end|>",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>\n",
    )
)


@register("qwen3_vl")
class HookedQwen3VL(HookedQwen2VL):
    """Qwen3-VL with hooks in the decoder (with `blocks.{k}.hook_deepstack` for the DeepStack
    layers), the vision tower (`vision.`, as Qwen2-VL's, with `vision.deepstack_mergers.{k}`)
    and the merger (`merger.`); see `HookedQwen2VL`.

    Examples:
        >>> from mmlens.testing import build_tiny_qwen3_vl
        >>> qwen = mmlens.from_pretrained(build_tiny_qwen3_vl("checkpoints/qwen3-vl"))
        >>> type(qwen).__name__, qwen.cfg.connector.deepstack_layers
        ('HookedQwen3VL', (0, 1))
    """

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        super().__init__(cfg, tokenizer, processor)
        self.rotary = RotaryEmbedding(
            cfg.d_head,
            cfg.rope_parameters,
            cfg.max_position_embeddings,
            sections=cfg.rope_parameters["mrope_section"],
            interleaved=bool(cfg.rope_parameters.get("mrope_interleaved", False)),
        )
        self.default_template = "qwen3_vl"
        self._deepstack: list[torch.Tensor] | None = None

    weight_renames = (
        *HookedQwen2VL.weight_renames,
        (r"^vision\.blocks\.(\d+)\.mlp\.linear_fc1\.", r"vision.blocks.\1.mlp.fc1."),
        (r"^vision\.blocks\.(\d+)\.mlp\.linear_fc2\.", r"vision.blocks.\1.mlp.fc2."),
        (r"^vision\.deepstack_merger_list\.", "vision.deepstack_mergers."),
    )

    decoder_type = "qwen3"

    @classmethod
    def vision_from_hf(cls, hf_vision: Any) -> tuple[VisionConfig, Qwen3VLVisionExtras]:
        """The tower (``hidden_size`` wide, an ``intermediate_size`` MLP), its position grid
        and DeepStack layers."""
        vision = qwen_vision_config(
            hf_vision,
            d_model=hf_vision.hidden_size,
            d_mlp=hf_vision.intermediate_size,
            kind="qwen3_vl",
        )
        extras = Qwen3VLVisionExtras(
            **qwen_extras_fields(hf_vision, hf_vision.out_hidden_size),
            num_position_embeddings=hf_vision.num_position_embeddings,
            deepstack_layers=tuple(hf_vision.deepstack_visual_indexes),
        )
        return vision, extras

    def build_connector(self, cfg: MMConfig) -> None:
        """Qwen3-VL's tower, its merger, and a `hook_deepstack` on each DeepStack layer."""
        self.vision = HookedQwen3VLVision(cfg.vision, cfg.connector)
        self.merger = Qwen3VLMerger(cfg.vision, cfg.connector, postshuffle=False)
        for layer in range(len(cfg.connector.deepstack_layers)):
            self.blocks[layer].hook_deepstack = HookPoint()  # [batch, pos, d_model]

    def encode_images(
        self,
        pixel_values: Float[torch.Tensor, "patch pixels"],
        image_grid_thw: Int[torch.Tensor, "image 3"] | None = None,
        **unused: Any,
    ) -> Float[torch.Tensor, "1 image_token d_model"]:
        """Tower -> merger, as Qwen2-VL's; the DeepStack mergers' outputs stay on the tower
        (`embed_input` places them)."""
        if image_grid_thw is None:
            raise ValueError("Qwen3-VL's pixels need image_grid_thw (model.prepare gives both)")
        features = self.vision(pixel_values, image_grid_thw)
        return self.merger(on_device_of(self.merger, features))

    def embed_input(
        self, input_ids: Int[torch.Tensor, "batch pos"], **multimodal: Any
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """`HookedLlava.embed_input`; with images, each DeepStack vector goes to its image
        token's position (``[batch, pos, d_model]`` per DeepStack layer, zero elsewhere), for
        `_run_block` to add; without, there is none (a generation step's new tokens)."""
        embeds = super().embed_input(input_ids, **multimodal)
        self._deepstack = None
        if multimodal.get("pixel_values") is not None:
            slots = input_ids == self.cfg.image_token_id
            self._deepstack = []
            for vectors in self.vision.deepstack:
                dense = embeds.new_zeros(embeds.shape)
                dense[slots] = vectors[0].to(device=embeds.device, dtype=embeds.dtype)
                self._deepstack.append(dense)
        return embeds

    def _run_block(
        self, layer: int, rows: _Rows, past: LayerKV | None, last_rows: bool = False
    ) -> LayerKV:
        """The block, then its DeepStack vectors at its rows' original positions."""
        new = super()._run_block(layer, rows, past, last_rows)
        if self._deepstack is not None and layer < len(self._deepstack):
            dense = self._deepstack[layer].to(rows.resid.device)
            positions = rows.positions.to(dense.device)
            inside = positions < dense.shape[1]
            index = positions.clamp(max=dense.shape[1] - 1)
            added = dense.gather(1, index[..., None].expand(*index.shape, dense.shape[-1]))
            added = added * inside[..., None]
            rows.resid = rows.resid + self.blocks[layer].hook_deepstack(added)
        return new
