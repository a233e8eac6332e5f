"""`MultimodalInput`: token ids and pixels that know where every segment and image patch is."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from PIL import Image, ImageDraw
from torch import Tensor

from mmlens.inputs.adapters import processor_adapter
from mmlens.inputs.geometry import ImageGeometry, image_size_of
from mmlens.inputs.images import as_image
from mmlens.inputs.layout import PATCH, Box, ImageTokenLayout, _item_layouts
from mmlens.inputs.segments import SEGMENTS, _segments
from mmlens.inputs.templates import IMAGE_PLACEHOLDER, ConversationTemplate, render
from mmlens.inputs.tokenization import TOKENIZATIONS, hf_token_spans, llava_token_ids


@dataclass(frozen=True)
class MultimodalInput:
    """A batch of prompts (with or without an image each), ready for any model call.

    Attributes:
        input_ids: ``[batch, pos]`` token ids, image tokens expanded, left-padded.
        attention_mask: ``[batch, pos]`` 1 for real tokens, 0 for padding.
        pixel_values: ``[n_images, channel, height, width]`` processed images in batch order, or
            None for a text-only batch.
        image_sizes: ``[n_images, 2]`` (height, width) of the original images, or None.
        prompts: the rendered prompt of each item, one placeholder per image (`find` searches it).
        image_token_id: id of the image placeholder token.
        segments: per item, segment name -> sorted positions (see `positions`).
        layout: the image-token layout of the whole batch.
        image_geometry: per image, how the processor maps its pixels (see `patches_in_box`):
            the family's `ImageTokenGeometry` (`ImageGeometry` for a single crop).
        image_items: per image, the batch item that holds it.
        token_spans: per item, ``[pos, 2]`` character span (start, end) of each token in
            `prompts[item]` (image tokens: their placeholder's span; specials, padding: (0, 0)).
        template: name of the conversation template used.
        image_sizes_for_model: whether `model_kwargs` passes `image_sizes` (when the processor
            returns them, as a tiling processor does; a single-crop one does not, and its vision
            tower would not accept them).
        batch_num_images_for_model: whether `model_kwargs` passes `batch_num_images` (the
            number of images of each item that has any, from `image_items`; a processor that
            tiles only an image alone in its prompt returns it).
        processor_fingerprint: `processor_fingerprint` of the processor that made the input; a
            model refuses an input made by a different processor (None: not checked).
        image_mode: the single-crop image geometry used ("pad", "crop", "squash"), or None for
            the checkpoint's processor as it is.
        anyres: a tiling family's tile canvas and unpadding rule, "hf" or "llava" (the
            family's `ANYRES_RULES`); `model_kwargs` passes "llava" to the model.
        tokenization: how the prompt was tokenised, "hf" or "llava"
            (`mmlens.inputs.tokenization.TOKENIZATIONS`).
        suffix: the text after the question in the user's turn (outside the `question`
            segment).
        image_processor: the image processor that made `pixel_values` (for
            ``patches_in_box(rule="mask")``).
        extra_inputs: further model inputs the processor made (a connector's own copy of the
            instruction, say), passed by `model_kwargs`; one row per item, or per image for
            those in `per_image_inputs`.
        per_image_inputs: the `extra_inputs` with one row per image (an image's grid, say).
        pixel_rows: per image, its rows of `pixel_values` where the processor gives images as
            rows of flattened patches (`ProcessorAdapter.pixel_rows`); None where
            `pixel_values` has one entry per image.

    Examples:
        >>> inp = MultimodalInput.from_processor(model.processor, [image, None], ["What is it?", "Hi"])
        >>> inp.positions("question", item=1), inp.patches_in_box((0, 0, 10, 10), image=0)
        (tensor([...]), tensor([32]))
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    pixel_values: Float[Tensor, "n_images channel height width"] | None
    image_sizes: Int[Tensor, "n_images 2"] | None
    prompts: list[str]
    image_token_id: int
    segments: list[dict[str, Int[Tensor, "n_positions"]]]
    layout: ImageTokenLayout
    image_geometry: list[Any]
    image_items: list[int]
    token_spans: list[Int[Tensor, "pos 2"]]
    template: str
    image_sizes_for_model: bool = False
    batch_num_images_for_model: bool = False
    processor_fingerprint: str | None = None
    image_mode: str | None = None
    anyres: str = "hf"
    tokenization: str = "hf"
    suffix: str = ""
    image_processor: Any = field(default=None, repr=False, compare=False)
    extra_inputs: dict[str, Tensor] = field(default_factory=dict)
    per_image_inputs: tuple[str, ...] = ()
    pixel_rows: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_images(self) -> int:
        return len(self.image_items)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def settings(self) -> dict[str, Any]:
        """How the prompt and pixels were made (what results record and presets check):
        template, suffix, image_mode, anyres and tokenization.

        Examples:
            >>> from mmlens.presets import CROSS_MODAL_FLOW
            >>> model.prepare(image, "Why?", preset=CROSS_MODAL_FLOW).settings["tokenization"]
            'llava'
        """
        return dict(
            template=self.template,
            suffix=self.suffix,
            image_mode=self.image_mode,
            anyres=self.anyres,
            tokenization=self.tokenization,
        )

    def positions(
        self, name: str, item: int = 0, image: int | None = None
    ) -> Int[Tensor, "n_positions"]:
        """Sorted sequence positions of segment `name` in batch item `item`.

        Args:
            name: one of "system", "image", "user", "question", "last" (see the module doc).
            item: batch item.
            image: with ``name="image"``, only the tokens of this image (its index in the batch,
                as in `patches_in_box`; for one prompt, its place in the prompt); `item` then
                defaults to the image's item.

        Returns:
            1-D LongTensor of indices into ``input_ids[item]`` (padding included in the count).

        Examples:
            >>> inp.positions("last")  # tensor([n_pos - 1]) for a single prompt
            tensor([104])
            >>> two = model.prepare([image, image], "Is the star in <image> as in <image>?")
            >>> [len(two.positions("image", image=k)) for k in range(2)], len(two.positions("image"))
            ([64, 64], 128)
        """
        if name not in SEGMENTS:
            raise ValueError(f"unknown segment {name!r}; valid names: {', '.join(SEGMENTS)}")
        if image is None:
            self._check_item(item)
            return self.segments[item][name]
        if name != "image":
            raise ValueError(f"image= selects image tokens; segment {name!r} has none")
        if not 0 <= image < self.n_images:
            raise ValueError(
                f"image {image} does not exist; this input has {self.n_images} image(s)"
            )
        owner = self.image_items[image]
        if item not in (0, owner):
            raise ValueError(f"image {image} belongs to batch item {owner}, not {item}")
        layout = self.layout
        return layout.position[(layout.image == image) & (layout.item == owner)].sort().values

    def find(self, substring: str, item: int = 0) -> Int[Tensor, "n_positions"]:
        """Positions of the tokens overlapping the first occurrence of `substring` in the prompt.

        Character offsets from the fast tokenizer decide the overlap (a token "▁door" covers
        " door", so `find("door")` returns it). The placeholder ``<image>`` stands for all of its
        image tokens.

        Examples:
            >>> inp.find("star")  # the token "star" (▁star with a Llama tokenizer)
            tensor([98])
        """
        self._check_item(item)
        prompt = self.prompts[item]
        start = prompt.find(substring) if substring else -1
        if start < 0:
            raise ValueError(
                f"{substring!r} does not occur in the prompt of item {item}: {prompt!r}"
            )
        spans = self.token_spans[item]
        overlapping = (spans[:, 0] < start + len(substring)) & (spans[:, 1] > start)
        return overlapping.nonzero().flatten().to(self.device)

    def patches_in_box(
        self, box: Box, image: int = 0, rule: str = "geometric"
    ) -> Int[Tensor, "n_positions"]:
        """Sequence positions (in the item holding `image`) of the patches the box's pixels land in.

        Args:
            box: ``(x0, y0, x1, y1)`` in pixels of the original image, x1 and y1 exclusive (a
                PIL crop box); ``(0, 0, width, height)`` is the whole image.
            image: index of the image in the batch (batch order, text-only items skipped).
            rule: ``"geometric"`` (default: a patch counts if any pixel of the box lands in it)
                or ``"mask"``, the Cross-modal paper's rule: paint the box pure red on a black
                image of the original size, preprocess it as the image was (without rescaling
                or normalising), and keep the patches that hold a pure-red pixel. Resampling
                blurs thin boxes, so the mask rule gives a subset, and nothing for boxes of a
                pixel or two (single-crop inputs only).

        Returns:
            sorted 1-D LongTensor of positions in ``input_ids[inp.image_items[image]]``; the CLS
            token and newline tokens are never included; empty if the box lies
            entirely in a cropped-away margin.

        The mapping follows the processor (pad to square, resize, centre crop); a patch counts if
        any pixel of the box lands in it (precise rule: `ImageGeometry.patch_ranges`). For a
        tiled image both views count: the base-grid patches the box lands in and the tile
        patches it lands in (the family's `patch_ranges_per_grid`).

        Raises:
            ValueError: unknown image, or an empty box / a box not inside the image.

        Examples:
            >>> width, height = image.size
            >>> len(inp.patches_in_box((0, 0, width // 2, height)))  # the left half of the image
            32
        """
        if not 0 <= image < self.n_images:
            raise ValueError(
                f"image {image} does not exist; this input has {self.n_images} image(s)"
            )
        if rule == "mask":
            return self._patches_in_painted_box(box, image)
        if rule != "geometric":
            raise ValueError(f"rule={rule!r}: use 'geometric' or 'mask'")
        layout = self.layout
        in_grid = {"base": layout.tile == 0, "tiles": layout.tile >= 1}
        in_box = torch.zeros_like(layout.kind, dtype=torch.bool)
        for grid, (rows, cols) in self.image_geometry[image].patch_ranges_per_grid(box).items():
            in_box |= (
                in_grid[grid]
                & (layout.row >= rows.start)
                & (layout.row < rows.stop)
                & (layout.col >= cols.start)
                & (layout.col < cols.stop)
            )
        return layout.position[in_box & (layout.image == image) & (layout.kind == PATCH)]

    def _patches_in_painted_box(self, box: Box, image: int) -> Int[Tensor, "n_positions"]:
        """`patches_in_box(rule="mask")`: the patches holding a pure-red pixel of the painted,
        preprocessed box."""
        geometry = self.image_geometry[image]
        if not isinstance(geometry, ImageGeometry) or self.image_processor is None:
            raise ValueError("rule='mask' needs a single-crop input made by from_processor/prepare")
        if self.pixel_rows is not None:
            raise ValueError(
                "rule='mask' reads the processor's pixels as images; this processor gives them as "
                "rows of flattened patches or of crops, not one image each: use rule='geometric'"
            )
        height, width = geometry.original_size
        mask = Image.new("RGB", (width, height))
        ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 0, 0))
        pixels = self.image_processor(
            mask, do_rescale=False, do_normalize=False, return_tensors="pt"
        )["pixel_values"][0]
        red = (pixels[0] == 255) & (pixels[1] == 0) & (pixels[2] == 0)
        rows, cols = geometry.grid_size
        side = geometry.patch_size
        has_red = red[: rows * side, : cols * side].reshape(rows, side, cols, side).any(3).any(1)
        grid = self.layout.patch_grid(image)
        return grid[has_red.to(grid.device)].sort().values

    def item(self, index: int) -> MultimodalInput:
        """Batch item `index` alone: a batch-1 input without its padding, positions renumbered
        (so `inp.item(i).positions("image")` is `inp.positions("image", item=i)` minus the
        item's padding).

        Examples:
            >>> batch = model.prepare([image, image], ["What is it?", "Is the star blue or red?"])
            >>> alone = batch.item(0)                  # the padding removed
            >>> batch.input_ids.shape, alone.input_ids.shape
            (torch.Size([2, 105]), torch.Size([1, 102]))
            >>> torch.allclose(model(alone)[0, -1], model(batch)[0, -1], atol=1e-4)
            True
        """
        self._check_item(index)
        real = self.attention_mask[index].bool()
        pad = int((~real).sum())
        images = [image for image, owner in enumerate(self.image_items) if owner == index]
        layout = self.layout
        entries = layout.item == index
        picked = {
            field.name: getattr(layout, field.name)[entries] for field in dataclasses.fields(layout)
        }
        renumber = torch.full((max(self.n_images, 1),), -1, dtype=torch.long)
        renumber[images] = torch.arange(len(images))
        picked.update(
            item=torch.zeros_like(picked["item"]),
            position=picked["position"] - pad,
            image=renumber.to(picked["image"].device)[picked["image"]],
        )

        def select(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None or not images else tensor[images]

        pixel_values, pixel_rows = select(self.pixel_values), None
        if self.pixel_rows is not None and pixel_values is not None:
            start = [sum(self.pixel_rows[:image]) for image in range(self.n_images)]
            rows = [
                row
                for image in images
                for row in range(start[image], start[image] + self.pixel_rows[image])
            ]
            pixel_values = self.pixel_values[rows]
            pixel_rows = [self.pixel_rows[image] for image in images]
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[index : index + 1, pad:],
            attention_mask=self.attention_mask[index : index + 1, pad:],
            pixel_values=pixel_values,
            pixel_rows=pixel_rows,
            image_sizes=select(self.image_sizes),
            prompts=[self.prompts[index]],
            segments=[{name: pos - pad for name, pos in self.segments[index].items()}],
            layout=ImageTokenLayout(**picked),
            image_geometry=[self.image_geometry[image] for image in images],
            image_items=[0] * len(images),
            token_spans=[self.token_spans[index][pad:]],
            extra_inputs={
                name: select(value) if name in self.per_image_inputs else value[index : index + 1]
                for name, value in self.extra_inputs.items()
                if name not in self.per_image_inputs or images
            },
        )

    def with_tokens(self, tokens: Int[Tensor, "batch n"] | Sequence[int]) -> MultimodalInput:
        """This input with `tokens` appended after every item's prompt (e.g. a teacher-forced
        answer, or generated tokens). Segments, layout and images are unchanged: the new
        positions belong to no segment, and `positions("last")` stays the last prompt position.

        Examples:
            >>> from mmlens.analysis import answer_token_ids
            >>> forced = inp.with_tokens(answer_token_ids(model, inp, "red"))   # [1, n] or a list
            >>> model(forced)[0, inp.input_ids.shape[1] - 1 :].shape    # the rows that predict them
            torch.Size([2, 70])
        """
        tokens = torch.as_tensor(tokens, device=self.device).long()
        tokens = tokens.expand(self.batch_size, -1) if tokens.ndim == 1 else tokens
        if tokens.shape[0] != self.batch_size:
            raise ValueError(f"{tokens.shape[0]} rows of tokens for a batch of {self.batch_size}")
        no_span = torch.zeros(tokens.shape[1], 2, dtype=torch.long)
        return dataclasses.replace(
            self,
            input_ids=torch.cat((self.input_ids, tokens), dim=1),
            attention_mask=torch.cat((self.attention_mask, torch.ones_like(tokens)), dim=1),
            token_spans=[
                torch.cat((spans, no_span.to(spans.device))) for spans in self.token_spans
            ],
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> MultimodalInput:
        """A copy with its tensors on `device` (and `pixel_values` cast to `dtype` if given)."""
        pixel_values = self.pixel_values
        if pixel_values is not None:
            pixel_values = pixel_values.to(device=device, dtype=dtype or pixel_values.dtype)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            pixel_values=pixel_values,
            image_sizes=None if self.image_sizes is None else self.image_sizes.to(device),
            segments=[{name: pos.to(device) for name, pos in seg.items()} for seg in self.segments],
            layout=self.layout.to(device),
            extra_inputs={name: value.to(device) for name, value in self.extra_inputs.items()},
        )

    def model_kwargs(self) -> dict[str, Tensor | str]:
        """The HF-style keyword tensors: ``model(**inp.model_kwargs())``.

        `input_ids` and `attention_mask`; `pixel_values` when there are images; `image_sizes`
        only for models that take them (`image_sizes_for_model`); ``anyres="llava"`` when the
        images were tiled by the original rule (mmlens' tiling models take it; HF's have no
        such rule: it ignores the keyword and, where the two rules differ, stops at the image
        token count).
        """
        kwargs: dict[str, Tensor | str] = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
        }
        if self.pixel_values is not None:
            kwargs["pixel_values"] = self.pixel_values
        if self.image_sizes_for_model and self.image_sizes is not None:
            kwargs["image_sizes"] = self.image_sizes
            if self.anyres != "hf":
                kwargs["anyres"] = self.anyres
        kwargs.update(self.extra_inputs)
        if self.batch_num_images_for_model and self.image_items:
            counts = torch.bincount(torch.tensor(self.image_items), minlength=self.batch_size)
            kwargs["batch_num_images"] = counts[counts > 0].to(self.input_ids.device)
        return kwargs

    def _check_item(self, item: int) -> None:
        if not 0 <= item < self.batch_size:
            raise ValueError(f"item {item} does not exist; the batch has {self.batch_size} item(s)")

    @classmethod
    def from_processor(
        cls,
        processor: Any,
        images: Any,
        prompts: str | Sequence[str],
        *,
        system: str | None = None,
        template: str | ConversationTemplate = "vicuna_v1",
        suffix: str = "",
        image_mode: str | None = None,
        anyres: str = "hf",
        tokenization: str = "hf",
        vision_feature_select_strategy: str | None = None,
        patch_size: int | None = None,
    ) -> MultimodalInput:
        """Render the prompts, run the HF processor, and locate segments and image tokens.

        Args:
            processor: the checkpoint's processor with a fast tokenizer, read through its
                `mmlens.inputs.adapters.ProcessorAdapter`.
            images: one image (PIL image, local path, uint8 array or float array in [0, 1]; see
                `mmlens.inputs.images.as_image`) or None for a single prompt; for a batch, a list with
                one entry per prompt: an image, None (text-only), or a list of images. A prompt
                with several images places each with an ``<image>`` in its question ("Is the
                <image> brighter than the <image>?"); for a single prompt, `images` may be that
                list.
            prompts: a question, or a list of questions (a batch, left-padded). With
                ``template="plain"`` the full prompt text, ``<image>`` placeholders included.
            system: replaces the template's system text.
            image_mode: single-crop image geometry, ``"pad"``, ``"crop"`` or ``"squash"``
                (`mmlens.inputs.geometry.with_image_mode`); None: the checkpoint's processor.
            anyres: a tiling family's tile canvas and unpadding rule, ``"hf"`` (default) or
                ``"llava"`` (the original code's; the family's `ANYRES_RULES`).
            tokenization: ``"hf"`` (the processor tokenises the whole prompt) or ``"llava"``
                (the original `tokenizer_image_token`; `mmlens.inputs.tokenization`).
            suffix: text after the question in the user's turn that is not part of the
                `question` segment (an answer-format instruction, e.g.
                `mmlens.inputs.templates.CROSS_MODAL_SUFFIX`).
            template: a name registered in `mmlens.inputs.templates` or a `ConversationTemplate`
                (a model's `prepare` passes its checkpoint's template).
            vision_feature_select_strategy: "default" (patch tokens only) or "full" (CLS first;
                single-crop processors only); default: the processor's.
            patch_size: the vision tower's patch size; default: the processor's.

        Returns:
            a `MultimodalInput` whose ids, mask and pixels are exactly what the processor produced
            for the rendered prompts (``padding=True``, left padding).

        Raises:
            ValueError: images and prompts do not match (a placeholder without an image, an image
                without a placeholder, more images than slots), or the image tokens do not match
                the patch grid.

        Examples:
            >>> inp = MultimodalInput.from_processor(model.processor, [image, None], ["Q1?", "Hi!"])
            >>> inp.pixel_values.shape  # llava-1.5: torch.Size([1, 3, 336, 336])
            torch.Size([1, 3, 112, 112])
            >>> inp.positions("image", item=1)  # a text-only prompt
            tensor([], dtype=torch.int64)
            >>> MultimodalInput.from_processor(next_model.processor, image, "Q1?").pixel_values.shape
            torch.Size([1, 5, 3, 28, 28])

            A tiling processor's pixels are ``[n_images, max_crops, 3, side, side]``: the base
            crop, then the tiles.
        """
        fingerprint = processor_fingerprint(processor)  # the checkpoint's, whatever the mode
        if tokenization not in TOKENIZATIONS:
            raise ValueError(
                f"tokenization={tokenization!r}: use one of {', '.join(TOKENIZATIONS)}"
            )
        adapter = processor_adapter(processor)
        for option, value, default in (("image_mode", image_mode, None), ("anyres", anyres, "hf")):
            if value != default and option not in adapter.options:
                applies = (
                    f"only {' and '.join(adapter.options)} applies"
                    if adapter.options
                    else "it has one geometry of its own"
                )
                raise ValueError(
                    f"{option}={value!r} does not apply to this checkpoint's {adapter.name} "
                    f"processor ({applies}); leave {option} at {default!r}"
                )
        geometry_processor = adapter.with_image_mode(processor, image_mode)
        processor = adapter.with_anyres(geometry_processor, anyres)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        image_groups = _image_groups(images, prompts)
        if len(image_groups) != len(prompt_list):
            raise ValueError(
                f"{len(image_groups)} image entries for {len(prompt_list)} prompts: pass one entry "
                "per prompt (an image, None for a text-only prompt, or a list of images for a "
                "prompt with one <image> per image), or [image] * n to ask several questions "
                "about one image"
            )
        image_list = [image for group in image_groups for image in group]
        strategy = vision_feature_select_strategy or getattr(
            processor, "vision_feature_select_strategy", None
        )
        patch_size = patch_size or getattr(processor, "patch_size", None)
        if strategy not in ("default", "full") or not patch_size:
            raise ValueError(
                f"need vision_feature_select_strategy ('default' or 'full', got {strategy!r}) and "
                f"patch_size (got {patch_size!r}); pass them (from the model config) or use a "
                "processor that has them"
            )
        image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
        # The id of the image tokens: the placeholder's, unless the processor names another (a
        # placeholder that is not one token, e.g. an image tag pair).
        image_token_id = getattr(processor, "image_token_id", None)
        if image_token_id is None:
            image_token_id = processor.tokenizer.convert_tokens_to_ids(image_token)
        rendered = [
            render(
                template,
                prompt,
                n_images=len(group),
                system=system,
                image_token=image_token,
                suffix=suffix,
            )
            for prompt, group in zip(prompt_list, image_groups, strict=True)
        ]
        given_images = image_list
        encoded = processor(
            images=given_images or None,
            text=[prompt.text for prompt in rendered],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
        pixel_values = encoded.get("pixel_values")

        image_items = [item for item, group in enumerate(image_groups) for _ in group]
        original_sizes = [image_size_of(image) for image in given_images]
        geometry = [
            adapter.geometry(
                geometry_processor, size, len(image_groups[item]) == 1, patch_size, anyres
            )
            for size, item in zip(original_sizes, image_items, strict=True)
        ]
        # Pixels as one entry per image end in its processed size (not rows of patches).
        checked = geometry if adapter.pixel_rows is None else []
        for image_index, image_geometry in enumerate(checked):
            if image_geometry.processed_size != tuple(pixel_values.shape[-2:]):
                raise ValueError(
                    f"image {image_index}: the processor produced {tuple(pixel_values.shape[-2:])} "
                    f"pixels but its settings predict {image_geometry.processed_size}"
                )

        # A CLS token in the sequence: kept ("full") and counted by the processor (CLIP: 1;
        # SigLIP towers have none, and their processors add no extra token).
        has_cls = strategy == "full" and getattr(processor, "num_additional_image_tokens", 1) == 1
        item_images = [
            [index for index, owner in enumerate(image_items) if owner == item]
            for item in range(len(rendered))
        ]
        image_token_counts = [
            [geometry[index].n_image_tokens(has_cls) for index in indices]
            for indices in item_images
        ]
        if tokenization == "llava" and adapter.places_image_tokens:
            raise ValueError(
                "tokenization='llava' is the original LLaVA code's; this checkpoint's "
                f"{adapter.name} processor places its image tokens itself: use tokenization='hf'"
            )
        if tokenization == "llava":
            input_ids, attention_mask, token_spans = llava_token_ids(
                processor.tokenizer, rendered, image_token_counts, image_token_id
            )
        else:
            input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        is_image = (input_ids == image_token_id) & attention_mask.bool()
        for item, counts in enumerate(image_token_counts):
            if int(is_image[item].sum()) != sum(counts):
                raise ValueError(
                    f"batch item {item} has {int(is_image[item].sum())} image tokens, but its "
                    f"{len(counts)} image(s) need {sum(counts)} with vision_feature_select_strategy="
                    f"{strategy!r}; check patch_size, the strategy and the processor's "
                    "num_additional_image_tokens against the model config"
                )
        if adapter.places_image_tokens:
            token_spans = processor.token_spans(
                [prompt.text for prompt in rendered], input_ids, attention_mask
            )
        elif tokenization == "hf":
            token_spans = hf_token_spans(
                processor.tokenizer, rendered, input_ids, attention_mask, image_token_counts
            )
        segments, layouts = [], []
        for item, prompt in enumerate(rendered):
            image_positions = is_image[item].nonzero().flatten()
            layouts += _item_layouts(item, item_images[item], image_positions, geometry, has_cls)
            segments.append(
                _segments(prompt, attention_mask[item], is_image[item], token_spans[item])
            )

        image_sizes = torch.tensor(original_sizes, dtype=torch.long) if original_sizes else None
        image_sizes_for_model = "image_sizes" in encoded  # tiling processors return them
        if image_sizes_for_model and not torch.equal(encoded["image_sizes"].cpu(), image_sizes):
            raise ValueError(
                f"the processor reports image sizes {encoded['image_sizes'].tolist()}, but the "
                f"images are {image_sizes.tolist()} (height, width)"
            )
        return cls(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            prompts=[prompt.text for prompt in rendered],
            image_token_id=image_token_id,
            segments=segments,
            layout=ImageTokenLayout.concatenate(layouts),
            image_geometry=geometry,
            image_items=image_items,
            token_spans=token_spans,
            template=template if isinstance(template, str) else template.name,
            image_sizes_for_model=image_sizes_for_model,
            batch_num_images_for_model="batch_num_images" in encoded,
            processor_fingerprint=fingerprint,
            image_mode=image_mode,
            anyres=anyres,
            tokenization=tokenization,
            suffix=suffix,
            image_processor=processor.image_processor,
            extra_inputs={
                name: encoded[name]
                for name in getattr(processor, "extra_model_inputs", ())
                if name in encoded  # e.g. an image input, absent from a text-only batch
            },
            per_image_inputs=tuple(getattr(processor, "per_image_inputs", ())),
            pixel_rows=None
            if adapter.pixel_rows is None or pixel_values is None
            else list(adapter.pixel_rows(processor, encoded)),
        )


def _image_groups(images: Any, prompts: str | Sequence[str]) -> list[list[Image.Image]]:
    """The images of each prompt, in order: one entry per prompt (None, an image, or a list of
    images); for a single prompt, `images` may be the list of its images."""

    def group(entry: Any) -> list[Image.Image]:
        if entry is None:
            return []
        entries = entry if isinstance(entry, (list, tuple)) else [entry]
        return [as_image(image) for image in entries if image is not None]

    if isinstance(prompts, str):
        return [group(images)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    return [group(entry) for entry in images]


def input_settings(inputs: MultimodalInput | Sequence[MultimodalInput]) -> dict[str, Any]:
    """The `settings` shared by `inputs`, as results record them; a setting on which inputs
    differ is given as the sorted list of their values ({} for text or token-id inputs).

    Examples:
        >>> padded = model.prepare(image, "Why?", image_mode="pad")
        >>> input_settings([padded, padded])["image_mode"]
        'pad'
        >>> input_settings([padded, inp])["image_mode"]     # mixed settings are listed
        ['pad', None]
    """
    batches = [inputs] if isinstance(inputs, MultimodalInput) else list(inputs)
    batches = [inp for inp in batches if isinstance(inp, MultimodalInput)]  # not text or ids
    settings: dict[str, Any] = {}
    for name in batches[0].settings if batches else ():
        values = {repr(inp.settings[name]): inp.settings[name] for inp in batches}
        settings[name] = (
            next(iter(values.values())) if len(values) == 1 else [values[k] for k in sorted(values)]
        )
    return settings


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def processor_fingerprint(processor: Any) -> str:
    """A short hash of what decides a `MultimodalInput`: the tokenizer's vocabulary (added
    tokens included), the image token and the image processor's settings.

    Two processors loaded from the same checkpoint give the same fingerprint. Computed once
    per processor object.

    Examples:
        >>> fingerprint = processor_fingerprint(model.processor)
        >>> len(fingerprint), fingerprint == processor_fingerprint(mmlens.load("tiny-shapes").processor)
        (16, True)
    """
    try:
        return _FINGERPRINTS[processor]
    except (KeyError, TypeError):
        pass
    tokenizer = processor.tokenizer
    parts = {
        "tokenizer": type(tokenizer).__name__,
        "vocab": sorted(tokenizer.get_vocab().items()),
        "image_token": getattr(processor, "image_token", None),
        "image_processor": processor.image_processor.to_dict(),
        "patch_size": getattr(processor, "patch_size", None),
        "strategy": getattr(processor, "vision_feature_select_strategy", None),
    }
    parts.update(processor_adapter(processor).fingerprint_parts(processor))
    encoded = json.dumps(parts, sort_keys=True, default=str).encode()
    fingerprint = hashlib.sha256(encoded).hexdigest()[:16]
    try:
        _FINGERPRINTS[processor] = fingerprint
    except TypeError:  # an object that cannot be weakly referenced: recomputed each time
        pass
    return fingerprint
