"""The original LLaVA release format, which both papers loaded (``liuhaotian/llava-v1.5-7b``,
``-13b``, ``liuhaotian/llava-v1.6-vicuna-7b``, ``lmms-lab/llama3-llava-next-8b``), and its v0
form, in which the LLaVA v0 releases and Shikra (``shikras/shikra-7b``, the From-Redundancy
paper's Table 1) ship: a Llama checkpoint whose ``config.json`` adds the ``mm_*`` settings, with
the projector under ``model.mm_projector.*`` (and LLaVA-NeXT's ``model.image_newline``), and the
CLIP tower in its own folder, named by ``mm_vision_tower`` (LLaVA-NeXT, which fine-tuned the
tower, also carries its weights under ``model.vision_tower.vision_tower.*``, and those win).

The v0 form: one linear projector (``mm_projector_type`` ``linear`` or not given), the image as
``<im_patch>`` tokens of the checkpoint's own vocabulary (``mm_use_im_patch_token``), between
``<im_start>`` and ``<im_end>`` (``mm_use_im_start_end``), a 224 px tower, and its conversation
(`V0_TEMPLATES`). Shikra and LLaVA v0 are published as deltas over LLaMA: `mmlens.models.delta`
applies them (``mmlens apply-delta``).

`read_original` turns such a folder into what the loader needs: the equivalent Hugging Face
``LlavaConfig`` (``image_aspect_ratio: pad``) or ``LlavaNextConfig`` (``anyres``), a processor
(the checkpoint's tokenizer with an ``<image>`` placeholder added after its vocabulary, the
tower's CLIP image processor, tiled for ``anyres``), the tensors under llava-hf names, and the
prompt settings the checkpoint was trained with (`OriginalCheckpoint.prepare_defaults`). Weights
load from safetensors, or from ``pytorch_model*.bin`` shards with
``torch.load(weights_only=True)``, which unpickles tensors only; no code from the folder runs
(docs/checkpoints.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmlens.inputs.templates import (
    LLAVA_V1_SYSTEM_PROMPT,
    ORIGINAL_TEMPLATES,
    VICUNA_V1_SYSTEM_PROMPT,
    ConversationTemplate,
    register_template,
)
from mmlens.loading import (
    CheckpointFormat,
    register_checkpoint_format,
    resolve_checkpoint,
    safetensors_items,
)

PROJECTORS = {"mlp2x_gelu": ("gelu", 2), "linear": ("linear", 1)}
"""``mm_projector_type`` values mmlens reads -> the projector's activation and layers: LLaVA-1.5's
two-layer GELU MLP, and the v0 releases' single linear layer."""

register_template(  # conv_llava_v0 (SeparatorStyle.SINGLE, sep "###"), the image first
    ConversationTemplate(
        name="llava_v0",
        pattern="{system}###Human: {image}{question}###Assistant:",
        default_system=LLAVA_V1_SYSTEM_PROMPT,
        image_slot="<im_start>{token}<im_end>\n",
        last_token="the ':' of 'Assistant:' (the last prompt token)",
        answer_prefix=" ",
    )
)
register_template(  # Shikra's vicuna_v1.1, its "<image> " at the start of the user's text
    ConversationTemplate(
        name="shikra",
        pattern="{system} USER: {image}{question} ASSISTANT:",
        default_system=VICUNA_V1_SYSTEM_PROMPT,
        image_slot="<im_start>{token}<im_end> ",
        last_token="the ':' of 'ASSISTANT:' (the last prompt token)",
        answer_prefix=" ",
    )
)
V0_TEMPLATES = {"shikra": "shikra", "llava": "llava_v0"}
"""The conversation of a v0-form release with ``<im_start>`` / ``<im_end>``, by the first of
these words in its ``architectures`` or ``model_type``: Shikra's `vicuna_v1.1` with the image
before the question, and LLaVA's `conv_llava_v0` as the LLaVA code runs v0 checkpoints."""

IMAGE_PATCH_TOKEN = "<im_patch>"
"""The image token of the v0 form's vocabulary (``DEFAULT_IMAGE_PATCH_TOKEN``)."""

_RENAMES = [
    (r"^model\.mm_projector\.0\.", "projector.linear_1."),
    (r"^model\.mm_projector\.(weight|bias)$", r"projector.linear_1.\1"),  # one linear layer
    (r"^model\.mm_projector\.2\.", "projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
    (r"^model\.vision_tower\.vision_model\.", "vision_tower."),  # a v0 release's own tower
    (r"^model\.image_newline$", "image_newline"),
]


def is_original(folder: Path) -> bool:
    """Whether `folder` holds an original-format LLaVA checkpoint (``mm_vision_tower`` set)."""
    config = folder / "config.json"
    return config.is_file() and "mm_vision_tower" in json.loads(config.read_text())


@dataclass(frozen=True)
class OriginalCheckpoint:
    """What `read_original` found: the HF config, the CLIP tower's folder, the raw config."""

    hf_config: Any
    tower: Path
    raw: dict[str, Any]

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT's tiling (``image_aspect_ratio: anyres``)."""
        return self.raw.get("image_aspect_ratio") == "anyres"

    @property
    def patch_tokens(self) -> bool:
        """The v0 form: the image is ``<im_patch>`` tokens of the vocabulary."""
        return _patch_tokens(self.raw)

    def prepare_defaults(self, family_template: str) -> dict[str, str]:
        """The prompt and image settings this checkpoint was trained with (`model.prepare`'s
        defaults; explicit keywords and presets win): ``tokenizer_image_token`` tokenisation,
        the original conversation of the tokenizer's family (`ORIGINAL_TEMPLATES`: vicuna_v1,
        llava_llama_3), and pad-to-square images or the original tiling rule."""
        if self.patch_tokens:  # the whole prompt tokenised at once, as the v0 code did
            return {"tokenization": "hf", "template": self.v0_template(family_template)}
        template = ORIGINAL_TEMPLATES.get(family_template, family_template)
        defaults = {"tokenization": "llava", "template": template}
        if self.anyres:
            defaults["anyres"] = "llava"
        elif self.raw.get("image_aspect_ratio") == "pad":  # else the processor's centre crop
            defaults["image_mode"] = "pad"
        return defaults

    def v0_template(self, family_template: str) -> str:
        """A v0-form release's conversation: `V0_TEMPLATES` where ``<im_start>`` /
        ``<im_end>`` frame the image, else the tokenizer family's."""
        if self.raw.get("mm_use_im_start_end"):
            architectures = self.raw.get("architectures") or []
            names = " ".join([*architectures, self.raw.get("model_type", "")])
            for word, template in V0_TEMPLATES.items():
                if word in names.lower():
                    return template
            return "llava_v0"
        return ORIGINAL_TEMPLATES.get(family_template, family_template)


def read_original(folder: Path) -> OriginalCheckpoint:
    """The equivalent `LlavaConfig` of an original-format folder, and its tower's folder.

    Raises:
        NotImplementedError: settings mmlens does not read yet (another projector, LLaVA-NeXT's
            ``anyres``, a tower that is not CLIP), named with what is supported.
        FileNotFoundError: the tower named by ``mm_vision_tower`` is not on disk.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaNextConfig

    raw = json.loads((folder / "config.json").read_text())
    projector = raw.get("mm_projector_type", "linear")
    if projector not in PROJECTORS:
        raise NotImplementedError(
            f"{folder}: mm_projector_type {projector!r} is not supported; supported: "
            f"{sorted(PROJECTORS)}"
        )
    aspect = raw.get("image_aspect_ratio", "square")  # the v0 code had none: centre crop
    merge = raw.get("mm_patch_merge_type", "flat")
    if (aspect, merge) not in (("pad", "flat"), ("square", "flat"), ("anyres", "spatial_unpad")):
        raise NotImplementedError(
            f"{folder}: image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is not "
            "supported; supported: pad or square with flat (LLaVA-1.5), anyres with "
            "spatial_unpad (LLaVA-NeXT)"
        )
    if raw.get("mm_use_im_start_end") and not _patch_tokens(raw):
        raise NotImplementedError(
            f"{folder}: mm_use_im_start_end=True with the '<image>' placeholder (LLaVA-1.x "
            "training with image start/end tokens) is not supported; the v0 form "
            f"(mm_use_im_patch_token, {IMAGE_PATCH_TOKEN} tokens) and the placeholder without "
            "start/end tokens are"
        )
    tower = resolve_checkpoint(raw["mm_vision_tower"])
    vision_config = CLIPVisionConfig.from_pretrained(tower)
    text = {key: value for key, value in raw.items() if not key.startswith("mm_")}
    text_config = LlamaConfig(**{**text, "model_type": "llama", "architectures": None})
    select = raw.get("mm_vision_select_feature", "patch")
    common = dict(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        # v0: the vocabulary's <im_patch>; else the placeholder added after the vocabulary
        image_token_index=_patch_token_id(folder) if _patch_tokens(raw) else text_config.vocab_size,
        # (the original code's default: the last layer)
        vision_feature_layer=raw.get("mm_vision_select_layer", -1),
        vision_feature_select_strategy={"patch": "default", "cls_patch": "full"}[select],
        projector_hidden_act=PROJECTORS[projector][0],
        projector_layers=PROJECTORS[projector][1],  # read by MMConfig.from_hf
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
    )
    if aspect == "anyres":
        hf_config = LlavaNextConfig(**common, image_grid_pinpoints=raw["image_grid_pinpoints"])
    else:
        hf_config = LlavaConfig(**common)
    return OriginalCheckpoint(hf_config, tower, raw)


def _patch_tokens(raw: dict[str, Any]) -> bool:
    """Whether a release writes its image as ``<im_patch>`` tokens of its vocabulary (the v0
    form: ``mm_use_im_patch_token``, implied by ``mm_use_im_start_end`` in the v0 code)."""
    return bool(raw.get("mm_use_im_patch_token", raw.get("mm_use_im_start_end", False)))


def _patch_token_id(folder: Path) -> int:
    """The id of ``<im_patch>`` in the release's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PATCH_TOKEN)
    if token_id in (None, tokenizer.unk_token_id):
        raise ValueError(
            f"{folder}: config.json writes images as {IMAGE_PATCH_TOKEN} tokens "
            f"(mm_use_im_patch_token / mm_use_im_start_end) but the tokenizer has no "
            f"{IMAGE_PATCH_TOKEN}; use the release's own tokenizer files"
        )
    return token_id


def original_processor(folder: Path, checkpoint: OriginalCheckpoint) -> Any:
    """A `LlavaProcessor` (`LlavaNextProcessor` for ``anyres``): the checkpoint's tokenizer
    with ``<image>`` added after its vocabulary, or, in the v0 form, its own ``<im_patch>`` as
    the image token (the padding token is the unknown token, as LLaVA trained, or the
    end-of-text token where there is none) and the tower's CLIP image settings."""
    from tokenizers import AddedToken
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    image_token = IMAGE_PATCH_TOKEN if checkpoint.patch_tokens else "<image>"
    if not checkpoint.patch_tokens:
        tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    if tokenizer.convert_tokens_to_ids(image_token) != checkpoint.hf_config.image_token_id:
        raise ValueError(
            f"{folder}: the tokenizer has {len(tokenizer)} entries with <image>; the config's "
            f"vocab_size {checkpoint.hf_config.text_config.vocab_size} does not match it"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    clip = CLIPImageProcessor.from_pretrained(checkpoint.tower)
    if checkpoint.anyres:
        settings = {key: getattr(clip, key) for key in _CLIP_SETTINGS}
        image_processor = LlavaNextImageProcessor(
            **settings, image_grid_pinpoints=checkpoint.raw["image_grid_pinpoints"], do_pad=True
        )
        processor_class = LlavaNextProcessor
    else:
        image_processor, processor_class = clip, LlavaProcessor
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=checkpoint.hf_config.vision_config.patch_size,
        vision_feature_select_strategy=checkpoint.hf_config.vision_feature_select_strategy,
        image_token=image_token,
        num_additional_image_tokens=1,
    )


_CLIP_SETTINGS = (
    "size", "crop_size", "do_resize", "do_center_crop", "resample", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
)  # fmt: skip


def original_tensors(folder: Path, checkpoint: OriginalCheckpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under llava-hf names (``mmlens.loading.mmlens_key`` renames them
    from there), the CLIP tower's vision weights filled in from its own folder where the
    checkpoint has none (LLaVA-1.5 kept CLIP frozen and did not save it)."""
    tensors = {}
    for key, tensor in _read_tensors(folder).items():
        for pattern, replacement in _RENAMES:
            key, n = re.subn(pattern, replacement, key)
            if n:
                break
        tensors[key] = tensor
    if not any(key.startswith("vision_tower.") for key in tensors):
        for key, tensor in _read_tensors(checkpoint.tower).items():
            if key.startswith("vision_model."):
                tensors["vision_tower." + key.removeprefix("vision_model.")] = tensor
    return tensors


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return dict(safetensors_items(shards))
    shards = sorted(folder.glob("pytorch_model*.bin"))
    if not shards:
        raise FileNotFoundError(f"{folder} has no *.safetensors or pytorch_model*.bin weights")
    tensors = {}
    for shard in shards:  # tensors only: weights_only refuses any other pickled object
        tensors.update(torch.load(shard, map_location="cpu", weights_only=True))
    return tensors


register_checkpoint_format(
    CheckpointFormat(
        name="original LLaVA release",
        matches=is_original,
        hf_config=lambda folder: read_original(folder).hf_config,
        processor=lambda folder: original_processor(folder, read_original(folder)),
        tensors=lambda folder: original_tensors(folder, read_original(folder)).items(),
        prepare_defaults=lambda folder, template: read_original(folder).prepare_defaults(template),
    )
)
