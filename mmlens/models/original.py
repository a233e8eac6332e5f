"""The original LLaVA release format, which both papers loaded (``liuhaotian/llava-v1.5-7b``,
``-13b``, ``liuhaotian/llava-v1.6-vicuna-7b``, ``lmms-lab/llama3-llava-next-8b``): a Llama
checkpoint whose ``config.json`` adds the ``mm_*`` settings, with the projector under
``model.mm_projector.*`` (and LLaVA-NeXT's ``model.image_newline``), and the CLIP tower in its own
folder, named by ``mm_vision_tower`` (LLaVA-NeXT, which fine-tuned the tower, also carries its
weights under ``model.vision_tower.vision_tower.*``, and those win).

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

from mmlens.inputs.templates import ORIGINAL_TEMPLATES
from mmlens.loading import (
    CheckpointFormat,
    register_checkpoint_format,
    resolve_checkpoint,
    safetensors_items,
)

PROJECTORS = {"mlp2x_gelu": "gelu"}
"""``mm_projector_type`` values mmlens reads: LLaVA-1.5's two-layer GELU MLP."""

_RENAMES = [
    (r"^model\.mm_projector\.0\.", "projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower."),
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

    def prepare_defaults(self, family_template: str) -> dict[str, str]:
        """The prompt and image settings this checkpoint was trained with (`model.prepare`'s
        defaults; explicit keywords and presets win): ``tokenizer_image_token`` tokenisation,
        the original conversation of the tokenizer's family (`ORIGINAL_TEMPLATES`: vicuna_v1,
        llava_llama_3), and pad-to-square images or the original tiling rule."""
        template = ORIGINAL_TEMPLATES.get(family_template, family_template)
        defaults = {"tokenization": "llava", "template": template}
        if self.anyres:
            defaults["anyres"] = "llava"
        elif self.raw.get("image_aspect_ratio", "pad") == "pad":
            defaults["image_mode"] = "pad"
        return defaults


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
    aspect = raw.get("image_aspect_ratio", "pad")
    merge = raw.get("mm_patch_merge_type", "flat")
    if (aspect, merge) not in (("pad", "flat"), ("square", "flat"), ("anyres", "spatial_unpad")):
        raise NotImplementedError(
            f"{folder}: image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r} is not "
            "supported; supported: pad or square with flat (LLaVA-1.5), anyres with "
            "spatial_unpad (LLaVA-NeXT)"
        )
    if raw.get("mm_use_im_start_end"):
        raise NotImplementedError(f"{folder}: mm_use_im_start_end=True is not supported")
    tower = resolve_checkpoint(raw["mm_vision_tower"])
    vision_config = CLIPVisionConfig.from_pretrained(tower)
    text = {key: value for key, value in raw.items() if not key.startswith("mm_")}
    text_config = LlamaConfig(**{**text, "model_type": "llama", "architectures": None})
    select = raw.get("mm_vision_select_feature", "patch")
    common = dict(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_index=text_config.vocab_size,  # the placeholder added after the vocabulary
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy={"patch": "default", "cls_patch": "full"}[select],
        projector_hidden_act=PROJECTORS[projector],
        tie_word_embeddings=raw.get("tie_word_embeddings", False),
    )
    if aspect == "anyres":
        hf_config = LlavaNextConfig(**common, image_grid_pinpoints=raw["image_grid_pinpoints"])
    else:
        hf_config = LlavaConfig(**common)
    return OriginalCheckpoint(hf_config, tower, raw)


def original_processor(folder: Path, checkpoint: OriginalCheckpoint) -> Any:
    """A `LlavaProcessor` (`LlavaNextProcessor` for ``anyres``): the checkpoint's tokenizer
    with ``<image>`` added after its vocabulary (the padding token is the unknown token, as LLaVA
    trained, or the end-of-text token where there is none) and the tower's CLIP image settings."""
    from tokenizers import AddedToken
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    if tokenizer.convert_tokens_to_ids("<image>") != checkpoint.hf_config.image_token_id:
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
        image_token="<image>",
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
