"""HookedLlava: LLaVA-1.5 = CLIP vision tower + projector + a hooked Llama/Vicuna decoder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int

from mmlens.config import MMConfig
from mmlens.hooks import HookPoint
from mmlens.inputs import MultimodalInput
from mmlens.inputs.arguments import check_prompts, warn_if_too_long, warn_unknown_words
from mmlens.inputs.images import without_alpha
from mmlens.inputs.templates import default_template
from mmlens.models.decoder import HookedTransformer
from mmlens.models.projector import Projector
from mmlens.models.registry import register
from mmlens.models.vision import HookedVisionTower, vision_config_from_hf


def on_device_of(module: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on `module`'s device (a device map may put consecutive modules on different
    devices, docs/checkpoints.md "Several devices")."""
    return tensor.to(next(module.parameters()).device)


@register("llava")
class HookedLlava(HookedTransformer):
    """LLaVA with hooks in the decoder, the vision tower (`vision.`) and the projector.

    Examples:
        >>> model = mmlens.load("tiny-shapes")   # or from_pretrained("llava-hf/llava-1.5-7b-hf")
        >>> inp = model.prepare(image, "What color is the star?")
        >>> logits, cache = model.run_with_cache(inp)
        >>> cache["hook_image_embeds"].shape  # [n_images, n_patches, d_model]: 576 for llava-1.5
        torch.Size([1, 64, 128])
    """

    image_inputs = ("pixel_values",)
    image_tokens_are_patches = True
    """Whether each image token shows a patch (LLaVA), so that boxes select image tokens."""
    spread_note = ""
    """How `tokens_to_patches` takes a map over the image tokens to the patches, in words
    (figure captions); empty where image tokens are patches."""
    paper_window_sizes: Mapping[str, Mapping[str, int]] = {
        # The Cross-modal paper's plots: window 9 for LLaVA-1.5-13B, 7 for 7B (its text says 9).
        "cross_modal_flow": {
            "llava-1.5-13b": 9,
            "llava-v1.5-13b": 9,
            "llava-1.5-7b": 7,
            "llava-v1.5-7b": 7,
        }
    }
    """Preset name -> checkpoint name (a part of the model's name, lower case) -> the knockout
    window that paper's code used for it (`mmlens.presets.Preset.window_size`)."""

    def __init__(self, cfg: MMConfig, tokenizer: Any = None, processor: Any = None):
        if cfg.vision is None:
            raise ValueError("HookedLlava needs a config with a vision tower (cfg.vision)")
        super().__init__(cfg, tokenizer)
        self.processor = processor
        self.vision = HookedVisionTower(cfg.vision)
        self.build_connector(cfg)
        self.hook_image_embeds = HookPoint()  # [n_images, n_image_tokens, d_model]
        family = default_template(self.tokenizer, cfg.decoder_model_type)
        self.default_template = family if family in ("chatml", "llama3") else "vicuna_v1"
        """The conversation template `prepare` uses unless told otherwise (LLaVA-1.5 ran with
        ``vicuna_v1``, LLaVA-Interleave's Qwen checkpoints with ChatML; a shipped organism sets
        the one it was trained with)."""
        self.prepare_defaults: dict[str, str] = {}  # the checkpoint's own prompt settings
        self.setup()

    @property
    def token_patch_size(self) -> int:
        """The side, in processed pixels, of the patch one image token shows: the tower's
        patch, or a multiple of it where the connector merges patches."""
        return self.cfg.vision.patch_size

    def spread_hook_names(self) -> list[str]:
        """The hooks whose activations `tokens_to_patches` reads: none, image tokens being
        patches."""
        return []

    def tokens_to_patches(
        self, activations: Mapping[str, torch.Tensor], image: int = 0
    ) -> Float[torch.Tensor, "image_token patch"]:
        """How image `image`'s tokens read the vision tower's patches, for a family whose
        image tokens are not patches (`image_tokens_are_patches` False); `activations` holds
        `spread_hook_names` of one forward pass. Here each token is a patch: an error."""
        raise ValueError(
            f"{type(self).__name__}'s image tokens are patches: use inp.layout.patch_grid(image)"
        )

    def vision_patch_index(
        self, inp: MultimodalInput, image: int = 0
    ) -> tuple[int, Int[torch.Tensor, "rows cols"]]:
        """Where the vision tower's hooks (``vision.blocks.{l}.*``) hold image `image`'s first
        crop (`vision_view`): the batch row (one per crop, images in turn) and, arranged as
        the crop's patch grid, each patch's index along the sequence (after the class token
        where the tower has one)."""
        first_crop = sum(geometry.n_crops for geometry in inp.image_geometry[:image])
        rows, cols = inp.image_geometry[image].vision_view.grid_size
        index = torch.arange(rows * cols).reshape(rows, cols) + int(self.cfg.vision.has_cls)
        return first_crop, index

    def vision_pixels(
        self, inp: MultimodalInput, image: int = 0
    ) -> Float[torch.Tensor, "channel height width"]:
        """Image `image`'s first crop as the vision tower sees it (normalised pixels)."""
        crop = inp.pixel_values[image]
        return crop[0] if crop.ndim == 4 else crop  # a tiling processor's: [crop, ...]

    def pixel_noise(
        self, pixel_values: torch.Tensor, std: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Gaussian noise of std `std` on the [0, 1] image, in the units of `pixel_values`
        (divided by the processor's ``image_std`` per channel), shaped like them; one draw of
        `generator` per value (LLaVA-CAM's SmoothGrad)."""
        image_std = torch.tensor(self.processor.image_processor.image_std).to(pixel_values)
        noise = torch.randn(pixel_values.shape, generator=generator, device=pixel_values.device)
        return noise.to(pixel_values) * (std / image_std[:, None, None])

    def build_connector(self, cfg: MMConfig) -> None:
        """The modules between the vision tower and the decoder: LLaVA's `projector`."""
        self.projector = Projector(
            cfg.vision.d_model * len(cfg.vision_feature_layers),
            cfg.d_model,
            cfg.projector_hidden_act,
            cfg.projector_bias,
        )

    @classmethod
    def config_from_hf(cls, hf_config: Any, **overrides: Any) -> MMConfig:
        """The decoder's and the LLaVA-style multimodal fields (`MMConfig.from_hf`) and the
        vision tower (`mmlens.models.vision.TOWER_TYPES`)."""
        vision = vision_config_from_hf(hf_config.vision_config)
        return MMConfig.from_hf(hf_config, vision=vision, **overrides)

    @classmethod
    def load_processor(cls, folder: Path, hf_config: Any) -> Any:
        """The checkpoint's processor (transformers' `AutoProcessor`; never remote code)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder, trust_remote_code=False)

    def _layer_counts(self) -> dict[str, int]:
        return {"": self.cfg.n_layers, "vision.": self.cfg.vision.n_layers}

    def prepare(
        self, images: Any, prompts: str | list[str], *, preset: Any = None, **kwargs: Any
    ) -> MultimodalInput:
        """Build a `MultimodalInput` with this checkpoint's processor (see `mmlens.inputs`):
        one image (or None) and a question, or lists of them for a padded batch; several images
        for one prompt as a list, each placed by an ``<image>`` in the question.

        `kwargs` go to `MultimodalInput.from_processor` (template, system, suffix, image_mode,
        anyres, tokenization); the template defaults to `default_template`. A `preset`
        (`mmlens.presets`) supplies the paper's settings; keywords given here override them.

        Examples:
            >>> from PIL import Image
            >>> inp = model.prepare(Image.open("pictures/cat.jpg"), "What color is the star?")
            >>> inp.positions("image")[[0, -1]], inp.positions("question")
            (tensor([32, 95]), tensor([ 96,  97,  98,  99, 100, 101]))
            >>> paper = model.prepare(image, "Is it red?", preset=mmlens.presets.CROSS_MODAL_FLOW)
            >>> paper.suffix
            ' \\nAnswer the question using a single word or phrase.'
        """
        if self.processor is None:
            raise ValueError("this model has no processor; load it with from_pretrained(folder)")
        check_prompts(prompts)
        if preset is not None:
            kwargs = {**preset.prepare_kwargs(self), **kwargs}
            images = without_alpha(images)  # as the original LLaVA (docs/semantics.md, "Images")
        kwargs = {"template": self.default_template, **self.prepare_defaults, **kwargs}
        inp = MultimodalInput.from_processor(
            self.processor,
            images,
            prompts,
            vision_feature_select_strategy=self.cfg.vision_feature_select_strategy,
            patch_size=self.token_patch_size,
            **kwargs,
        )
        warn_if_too_long(inp.input_ids.shape[1], self.cfg.max_position_embeddings)
        warn_unknown_words(inp, self.processor.tokenizer.unk_token_id)
        return inp.to(self.W_E.device)

    def encode_images(
        self, pixel_values: Float[torch.Tensor, "image channel height width"], **unused: Any
    ) -> Float[torch.Tensor, "image token d_model"]:
        """Vision tower -> selected features -> projector: the embeddings of the image slots,
        in slot order (LLaVA-1.5 ignores `image_sizes`; NeXT needs them)."""
        features = self.vision(
            pixel_values, self.cfg.vision_feature_layers, self.cfg.vision_feature_select_strategy
        )
        return self.projector(on_device_of(self.projector, features))

    def embed_input(
        self,
        input_ids: Int[torch.Tensor, "batch pos"],
        pixel_values: Float[torch.Tensor, "image channel height width"] | None = None,
        **image_kwargs: Any,
    ) -> Float[torch.Tensor, "batch pos d_model"]:
        """Token embeddings (`hook_token_embed`) with the image slots filled by
        `hook_image_embeds`: `hook_embed`, the residual stream entering the first block.

        `hook_token_embed` holds the embedding lookup of every id (the `<image>` placeholder's
        embedding at image slots, which the image features then replace); `hook_embed` holds the
        projected image features there, so that the embedding term of a residual decomposition
        (`cache.decompose_resid()`) is what the model added, at text and image positions alike.
        `image_kwargs` (e.g. `image_sizes`) go to `encode_images`.
        """
        image_slots = input_ids == self.cfg.image_token_id
        # An original-format checkpoint's placeholder comes after its vocabulary: look up id 0
        # there (the image features replace it).
        lookup = (
            input_ids.masked_fill(image_slots, 0)
            if self.cfg.image_token_id >= self.cfg.d_vocab
            else input_ids
        )
        embeds = self.hook_token_embed(self.embed(lookup))
        n_slots = int(image_slots.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(
                    f"the input has {n_slots} image tokens but no pixel_values; pass the image "
                    "(model.prepare(image, prompt)) or remove '<image>' from the prompt"
                )
            return self.hook_embed(embeds)
        image_embeds = self.hook_image_embeds(self.encode_images(pixel_values, **image_kwargs))
        n_embeds = image_embeds.shape[:-1].numel()
        if n_embeds != n_slots:
            raise ValueError(
                f"the image(s) give {n_embeds} image embeddings but the input has {n_slots} image "
                "tokens; use one '<image>' per image and let model.prepare (or the checkpoint's "
                "processor) expand it"
            )
        image_embeds = image_embeds.to(device=embeds.device, dtype=embeds.dtype)
        return self.hook_embed(embeds.masked_scatter(image_slots[..., None], image_embeds))
