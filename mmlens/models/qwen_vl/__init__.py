"""HookedQwenVL: the original Qwen-VL / Qwen-VL-Chat (the From-Redundancy paper's Qwen-VL) =
an OpenCLIP ViT-bigG/14 at 448 px + a cross-attention resampler (256 learned queries) + a
Qwen-7B decoder.

The release shipped as remote code; mmlens reads it natively (`mmlens.models.qwen_vl.release`)
and runs none of it. The tower has no class token and learned positions on a 16 x 16 grid,
resized bicubically to its 32 x 32 patches; its last block's output goes to the resampler
(`mmlens.models.qwen_vl.resampler`), whose 256 queries, each a mixture of every patch, are
the image's 256 tokens in the decoder, between ``<img>`` and ``</img>``: like InstructBLIP's
queries, no image token is a patch, and maps over the image reach the patches through the
resampler's cross-attention (`tokens_to_patches`). The decoder is Qwen-7B: RMSNorm, rotary on
the whole head, SwiGLU, biases on query, key and value only. Past the release's training
length (``seq_length``, 2048) Qwen changes its rotary base (dynamic NTK) and scales queries
(log-n attention); mmlens refuses such lengths rather than compute them otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from mmlens.config import MMConfig, VisionConfig
from mmlens.inputs.templates import ConversationTemplate, register_template
from mmlens.loading import CheckpointFormat, register_checkpoint_format
from mmlens.models.llava import HookedLlava, on_device_of
from mmlens.models.qwen_vl.processor import QwenVLProcessor
from mmlens.models.qwen_vl.release import (
    IMAGE_SPAN,
    SPECIAL_TOKENS,
    QwenVLReleaseConfig,
    is_qwen_vl,
    release_tensors,
)
from mmlens.models.qwen_vl.resampler import HookedResampler, ResamplerConfig
from mmlens.models.registry import register

QWEN_VL_CHAT_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system text of Qwen-VL-Chat's ``chat()``."""

register_template(  # Qwen-VL-Chat's make_context: ChatML, the image as "Picture 1: <img>..."
    ConversationTemplate(
        name="qwen_vl_chat",
        pattern="{system}<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n",
        default_system=QWEN_VL_CHAT_SYSTEM_PROMPT,
        image_slot="Picture 1: {token}\n",
        last_token="the '\\n' ending '<|im_start|>assistant\\n' (the last prompt token)",
        system_slot="<|im_start|>system\n{text}<|im_end|>\n",
    )
)
register_template(  # Qwen-VL's raw format (its from_list_format, no conversation)
    ConversationTemplate(
        name="qwen_vl",
        pattern="{image}{question}",
        default_system="",
        image_slot="Picture 1: {token}\n",
        last_token="the last token of the question (the last prompt token)",
    )
)


@register("qwen_vl")
class HookedQwenVL(HookedLlava):
    """Qwen-VL / Qwen-VL-Chat with hooks in the decoder, the vision tower (`vision.`) and the
    resampler (`resampler.`).

    `hook_image_embeds` holds ``[n_images, 256, d_model]``: the resampler's outputs in query
    order (`inp.layout` kind "query", `col` the query's index).

    Examples:
        >>> qwen_vl = mmlens.from_pretrained(qwen_vl_folder)   # a random one, 16 queries
        >>> inp = qwen_vl.prepare(image, "What colour is the star?")
        >>> logits, cache = qwen_vl.run_with_cache(inp)
        >>> cache["resampler.hook_pattern"].shape   # [image, head, query, patch]: 6 x 6 patches
        torch.Size([1, 2, 16, 36])
        >>> first = int(inp.positions("image")[0])
        >>> qwen_vl.to_string(inp.input_ids[0, :first]).endswith("user\\nPicture 1: <img>")
        True
    """

    image_tokens_are_patches = False  # each query mixes every patch
    spread_note = (
        "each query token's relevance, spread over the patches by the resampler's "
        "cross-attention (mean over heads)."
    )
    """How `tokens_to_patches` takes a map over the queries to the patches, in words."""

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        if not isinstance(cfg.connector, ResamplerConfig):
            raise ValueError(
                "HookedQwenVL needs a ResamplerConfig as cfg.connector (load a Qwen-VL release "
                "folder with mmlens.from_pretrained)"
            )
        super().__init__(cfg, tokenizer, processor)
        self.default_template = (
            "qwen_vl_chat" if cfg.connector.chat_format == "chatml" else "qwen_vl"
        )

    def build_connector(self, cfg: MMConfig) -> None:
        """The resampler (with the tower's `ln_post` and `proj`, which follow it)."""
        self.resampler = HookedResampler(cfg.connector)

    @classmethod
    def config_from_hf(cls, hf_config: QwenVLReleaseConfig, **overrides: Any) -> MMConfig:
        """The decoder, the tower and the resampler of a release's ``config.json``. Qwen's
        ``intermediate_size`` counts both halves of its SwiGLU, so each is half of it."""
        raw, visual = hf_config.raw, hf_config.raw["visual"]
        width = visual["width"]
        vision = VisionConfig(
            n_layers=visual["layers"],
            d_model=width,
            n_heads=visual["heads"],
            d_mlp=int(width * visual["mlp_ratio"]),
            image_size=visual["image_size"],
            patch_size=visual["patch_size"],
            eps=1e-6,
            act_fn="gelu",
            kind="qwen_vl",
            has_cls=False,
            n_positions=visual.get("n_positions", 256),
        )
        n_queries = visual.get("n_queries", IMAGE_SPAN)
        connector = ResamplerConfig(
            n_queries=n_queries,
            d_model=visual["output_dim"],
            n_heads=visual["output_dim"] // 128,
            d_kv=width,
            chat_format=hf_config.chat_format,
        )
        special_ids = _special_ids(raw["vocab_size"], visual["image_start_id"])
        # Past seq_length the release changes its rotary base and query scale: refused there.
        long_context = raw.get("use_dynamic_ntk") or raw.get("use_logn_attn")
        limit_reason = (
            f"Qwen-VL is past its training length of {raw['seq_length']} tokens and changes its "
            "rotary base (dynamic NTK) and query scale (log-n attention)"
        )
        fields: dict[str, Any] = dict(
            n_layers=raw["num_hidden_layers"],
            d_model=raw["hidden_size"],
            n_heads=raw["num_attention_heads"],
            d_head=raw.get("kv_channels", raw["hidden_size"] // raw["num_attention_heads"]),
            d_mlp=raw["intermediate_size"] // 2,
            d_vocab=raw["vocab_size"],
            eps=raw["layer_norm_epsilon"],
            rope_parameters={"rope_type": "default", "rope_theta": raw["rotary_emb_base"]},
            max_position_embeddings=raw["max_position_embeddings"],
            rotary_limit=raw["seq_length"] if long_context else None,
            rotary_limit_reason=limit_reason,
            qkv_bias=True,
            attention_bias=not raw.get("no_bias", True),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            pad_token_id=special_ids["<|endoftext|>"],
            eos_token_id=[special_ids["<|im_end|>"], special_ids["<|endoftext|>"]]
            if hf_config.chat_format == "chatml"
            else special_ids["<|endoftext|>"],
            model_type="qwen_vl",
            decoder_model_type="qwen",
            model_name=hf_config.name_or_path,
            vision=vision,
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_token_id=special_ids["<imgpad>"],
            connector=connector,
        )
        return MMConfig(**{**fields, **overrides})

    @classmethod
    def load_processor(cls, folder: Path, hf_config: QwenVLReleaseConfig) -> QwenVLProcessor:
        """The release's tokenizer and image transform (`QwenVLProcessor.from_release`)."""
        visual = hf_config.raw["visual"]
        return QwenVLProcessor.from_release(
            folder,
            image_size=visual["image_size"],
            patch_size=visual["patch_size"],
            n_queries=visual.get("n_queries", IMAGE_SPAN),
        )

    def spread_hook_names(self) -> list[str]:
        """The resampler's cross-attention pattern (what `tokens_to_patches` reads)."""
        return ["resampler.hook_pattern"]

    def tokens_to_patches(
        self, activations: Mapping[str, torch.Tensor], image: int = 0
    ) -> Float[torch.Tensor, "query patch"]:
        """How the queries read the patches of image `image`: the resampler's pattern in
        `activations` (a cache or a dict), mean over heads; each row sums to 1. A map over the
        queries times this matrix is a map over the patches (row-major on the patch grid).

        Examples:
            >>> qwen_vl_inp = qwen_vl.prepare(image, "What colour is the star?")
            >>> _, cache = qwen_vl.run_with_cache(qwen_vl_inp)
            >>> qwen_vl.tokens_to_patches(cache).shape     # 16 queries, 6 x 6 patches
            torch.Size([16, 36])
        """
        pattern = activations["resampler.hook_pattern"][image].detach().float()
        return pattern.mean(0).cpu()

    def encode_images(
        self, pixel_values: Float[torch.Tensor, "image channel height width"], **unused: Any
    ) -> Float[torch.Tensor, "image query d_model"]:
        """Vision tower (last block) -> resampler -> `ln_post` and `proj`: the embeddings of
        the image slots, `n_queries` per image."""
        features = self.vision(pixel_values, [-1], "full")
        return self.resampler(on_device_of(self.resampler, features))


def _special_ids(vocab_size: int, image_start_id: int) -> dict[str, int]:
    """The ids of Qwen's special tokens, counted from ``<img>``'s (the config's
    ``image_start_id``), which the release's tokenizer places after its BPE ranks."""
    first = image_start_id - SPECIAL_TOKENS.index("<img>")
    ids = {token: first + index for index, token in enumerate(SPECIAL_TOKENS)}
    if max(ids.values()) >= vocab_size:
        raise ValueError(
            f"config.json: image_start_id {image_start_id} puts Qwen's special tokens past "
            f"vocab_size {vocab_size}"
        )
    return ids


register_checkpoint_format(
    CheckpointFormat(
        name="original Qwen-VL release",
        matches=is_qwen_vl,
        hf_config=QwenVLReleaseConfig.read,
        processor=lambda folder: HookedQwenVL.load_processor(
            folder, QwenVLReleaseConfig.read(folder)
        ),
        tensors=lambda folder: release_tensors(
            folder, QwenVLReleaseConfig.read(folder).raw["visual"]["heads"]
        ),
        prepare_defaults=lambda folder, template: {"template": template},
        reads_every_file=True,
    )
)
