"""MultimodalInput: segments, find, image-token layout and patches_in_box, against independent counts
and a mask-image oracle run through the real HF image processor."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaProcessor
from transformers.image_utils import PILImageResampling

from mmlens.inputs import CLS, PATCH, SEGMENTS, ImageGeometry, MultimodalInput
from mmlens.inputs.templates import VICUNA_V1_SYSTEM_PROMPT, get_template, render
from mmlens.testing import TEST_IMAGE_SIZES, make_image_processor, make_test_image

QUESTION = "What colour is the door?"
LONG_QUESTION = "Is there a red circle in the top left corner of the picture, next to the tree?"
N_PATCHES = (56 // 14) ** 2


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    return AutoProcessor.from_pretrained(tiny_llava_dir)


@pytest.fixture(scope="module")
def full_processor(tiny_checkpoint):
    return AutoProcessor.from_pretrained(tiny_checkpoint(vision_feature_select_strategy="full"))


def arange(start: int, stop: int) -> torch.Tensor:
    return torch.arange(start, stop, dtype=torch.long)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.long and actual.ndim == 1
    assert actual.tolist() == expected.tolist()


# --- templates -------------------------------------------------------------------------------


def test_vicuna_v1_template_renders_the_llava_1_5_prompt_and_its_spans() -> None:
    rendered = render("vicuna_v1", QUESTION, n_images=1)
    assert rendered.text == f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\n{QUESTION} ASSISTANT:"
    assert rendered.text[slice(*rendered.question_span)] == QUESTION
    assert rendered.image_spans == (
        (len(VICUNA_V1_SYSTEM_PROMPT) + 7, len(VICUNA_V1_SYSTEM_PROMPT) + 14),
    )
    assert rendered.user_start == rendered.image_spans[0][0]

    text_only = render("vicuna_v1", QUESTION, n_images=0, system="Be brief.")
    assert text_only.text == f"Be brief. USER: {QUESTION} ASSISTANT:"
    assert text_only.image_spans == () and text_only.user_start == text_only.question_span[0] == 16
    assert "ASSISTANT" in get_template("vicuna_v1").last_token


def test_plain_template_uses_the_prompt_verbatim() -> None:
    prompt = "<image>\n  Describe the image. "
    rendered = render("plain", prompt, n_images=1)
    assert rendered.text == prompt and rendered.image_spans == ((0, 7),)
    assert rendered.text[slice(*rendered.question_span)] == "Describe the image."
    text_only = render("plain", "Hello there", n_images=0)
    assert text_only.question_span == (0, 11) and text_only.user_start == 0


# --- segments --------------------------------------------------------------------------------


def test_segments_of_a_known_prompt(processor, images) -> None:
    inp = MultimodalInput.from_processor(processor, images[1], QUESTION)
    tokenizer = processor.tokenizer
    text = f"{VICUNA_V1_SYSTEM_PROMPT} USER: <image>\n{QUESTION} ASSISTANT:"
    assert inp.prompts == [text]
    # Independent counts: the prefix before the placeholder tokenized alone (with <s>), the
    # unexpanded prompt, and (56 / 14)^2 image tokens in place of the one placeholder.
    n_prefix = len(tokenizer(text[: text.index("<image>")]).input_ids)
    n_total = len(tokenizer(text).input_ids) - 1 + N_PATCHES
    assert inp.input_ids.shape == (1, n_total)
    assert torch.equal(
        inp.input_ids, processor(images=images[1], text=text, return_tensors="pt").input_ids
    )

    assert_equal(inp.positions("system"), arange(0, n_prefix))
    assert_equal(inp.positions("image"), arange(n_prefix, n_prefix + N_PATCHES))
    assert_equal(inp.positions("user"), arange(n_prefix + N_PATCHES, n_total))
    assert_equal(inp.positions("last"), torch.tensor([n_total - 1]))
    # The user turn is "\n" (byte token), the question, " ASSISTANT:" (one token here).
    tokens = tokenizer.convert_ids_to_tokens(inp.input_ids[0])
    assert tokens[n_prefix + N_PATCHES] == "<0x0A>" and tokens[-1] == "▁ASSISTANT:"
    assert_equal(inp.positions("question"), arange(n_prefix + N_PATCHES + 1, n_total - 1))
    assert tokenizer.decode(inp.input_ids[0, inp.positions("question")]) == QUESTION
    assert set(inp.layout.kind_names()) == {"patch"} and inp.image_sizes.tolist() == [[48, 88]]


def test_full_strategy_puts_the_cls_token_first(full_processor, images) -> None:
    inp = MultimodalInput.from_processor(full_processor, images[0], QUESTION)
    image_positions = inp.positions("image")
    assert len(image_positions) == N_PATCHES + 1
    layout = inp.layout
    assert layout.kind_names()[0] == "cls" and int(layout.kind[0]) == CLS
    assert (layout.row[0], layout.col[0]) == (-1, -1) and (layout.kind[1:] == PATCH).all()
    assert_equal(layout.position, image_positions)
    width, height = images[0].size
    assert_equal(inp.patches_in_box((0, 0, width, height)), image_positions[1:])  # never the CLS
    assert_equal(inp.layout.patch_grid(0).flatten(), image_positions[1:])


def test_text_only_prompt(processor) -> None:
    inp = MultimodalInput.from_processor(processor, None, QUESTION)
    tokenizer = processor.tokenizer
    n_system = len(tokenizer(f"{VICUNA_V1_SYSTEM_PROMPT} USER:").input_ids)
    n_total = len(tokenizer(inp.prompts[0]).input_ids)
    assert inp.prompts[0] == f"{VICUNA_V1_SYSTEM_PROMPT} USER: {QUESTION} ASSISTANT:"
    assert_equal(inp.positions("system"), arange(0, n_system))
    assert_equal(inp.positions("image"), arange(0, 0))
    assert_equal(inp.positions("user"), arange(n_system, n_total))
    assert tokenizer.decode(inp.input_ids[0, inp.positions("question")]) == QUESTION
    assert inp.pixel_values is None and inp.image_sizes is None and len(inp.layout) == 0
    assert set(inp.model_kwargs()) == {"input_ids", "attention_mask"}


def test_batch_is_left_padded_and_positions_shift_by_the_pad_count(processor, images) -> None:
    prompts = [QUESTION, LONG_QUESTION, "Hi!"]
    batch_images = [images[0], images[2], None]
    batch = MultimodalInput.from_processor(processor, batch_images, prompts)
    expected = processor(
        images=batch_images[:2], text=batch.prompts, padding=True, return_tensors="pt"
    )
    assert torch.equal(batch.input_ids, expected.input_ids)
    assert torch.equal(batch.pixel_values, expected.pixel_values)
    assert batch.image_items == [0, 1] and batch.image_sizes.tolist() == [[56, 56], [80, 40]]

    n_pos = batch.input_ids.shape[1]
    for item, (image, prompt) in enumerate(zip(batch_images, prompts, strict=True)):
        alone = MultimodalInput.from_processor(processor, image, prompt)
        pad = n_pos - alone.input_ids.shape[1]
        assert pad == int((batch.attention_mask[item] == 0).sum())
        assert (batch.attention_mask[item, :pad] == 0).all() and (
            batch.attention_mask[item, pad:] == 1
        ).all()
        assert torch.equal(batch.input_ids[item, pad:], alone.input_ids[0])
        for name in SEGMENTS:
            assert_equal(batch.positions(name, item), alone.positions(name) + pad)
        assert_equal(batch.find("the", item), alone.find("the") + pad)
        # Pads are in no segment; system, image and user tile the real positions.
        tiled = torch.cat([batch.positions(name, item) for name in ("system", "image", "user")])
        assert_equal(tiled, arange(pad, n_pos))
        assert set(batch.positions("question", item).tolist()) <= set(
            batch.positions("user", item).tolist()
        )
    for image_index, item in enumerate(batch.image_items):
        alone = MultimodalInput.from_processor(processor, batch_images[item], prompts[item])
        pad = n_pos - alone.input_ids.shape[1]
        assert_equal(
            batch.patches_in_box((0, 0, 10, 10), image_index),
            alone.patches_in_box((0, 0, 10, 10)) + pad,
        )
        assert (batch.layout.item[batch.layout.image == image_index] == item).all()


def test_plain_template(processor, images) -> None:
    prompt = "<image>\nDescribe the image in detail."
    inp = MultimodalInput.from_processor(processor, images[0], prompt, template="plain")
    assert inp.prompts == [prompt] and inp.template == "plain"
    image = inp.positions("image")
    assert_equal(inp.positions("system"), arange(0, int(image[0])))
    assert_equal(inp.positions("user"), arange(int(image[-1]) + 1, inp.input_ids.shape[1]))
    tokenizer = processor.tokenizer
    assert (
        tokenizer.decode(inp.input_ids[0, inp.positions("question")])
        == "Describe the image in detail."
    )


# --- find ------------------------------------------------------------------------------------


def test_find_uses_character_offsets(processor, images) -> None:
    inp = MultimodalInput.from_processor(processor, [images[0], None], [QUESTION, LONG_QUESTION])
    tokenizer = processor.tokenizer
    ids = inp.input_ids

    def text_of(positions: torch.Tensor, item: int = 0) -> str:
        return tokenizer.decode(ids[item, positions])

    door = inp.find("door")
    assert "door" in text_of(door) and len(door) == 1 and int(door[0]) in inp.positions("question")
    assert text_of(inp.find("colour is")).strip() == "colour is"
    curious = inp.find("curious")
    assert text_of(curious).strip() == "curious" and set(curious.tolist()) <= set(
        inp.positions("system").tolist()
    )
    assert_equal(inp.find("<image>"), inp.positions("image"))
    assert_equal(inp.find("ASSISTANT:"), inp.positions("last"))
    # The first occurrence: "the" of "the human" in the system text, not the question's "the".
    assert int(inp.find("the")[0]) < int(inp.positions("image")[0])
    assert "tree" in text_of(inp.find("tree", item=1), item=1)
    # Every real text token's span is its own text (offsets are mapped back past the image block).
    for item in range(2):
        prompt, spans = inp.prompts[item], inp.token_spans[item]
        for position in inp.positions("user", item).tolist():
            start, end = spans[position].tolist()
            token = tokenizer.convert_ids_to_tokens(int(ids[item, position]))
            assert prompt[start:end] == {"<0x0A>": "\n"}.get(token, token.replace("▁", " "))


# --- errors ----------------------------------------------------------------------------------


def test_mismatched_images_and_placeholders_raise_helpful_errors(processor, images) -> None:
    image = images[0]
    with pytest.raises(ValueError, match="places 1 image.*0 image.*one image per placeholder"):
        MultimodalInput.from_processor(processor, None, "<image>\nWhat is this?")
    with pytest.raises(ValueError, match="1 '<image>' placeholder.*0 image.*pass an image"):
        MultimodalInput.from_processor(processor, None, "<image>\nWhat is this?", template="plain")
    with pytest.raises(ValueError, match="1 image.*0 '<image>' placeholder.*write one '<image>'"):
        MultimodalInput.from_processor(processor, image, "What is this?", template="plain")
    with pytest.raises(ValueError, match="2 images were given.*one '<image>' per image in the"):
        MultimodalInput.from_processor(processor, [image, image], QUESTION)
    with pytest.raises(ValueError, match="1 image entries for 2 prompts.*None for a text-only"):
        MultimodalInput.from_processor(processor, [image], [QUESTION, QUESTION])
    with pytest.raises(ValueError, match="no system text"):
        MultimodalInput.from_processor(processor, image, "<image> Hi", template="plain", system="x")
    with pytest.raises(ValueError, match="unknown template 'vicuna'.*llava_v1"):
        MultimodalInput.from_processor(processor, image, QUESTION, template="vicuna")
    with pytest.raises(ValueError, match="need vision_feature_select_strategy"):
        MultimodalInput.from_processor(
            processor, image, QUESTION, vision_feature_select_strategy="cls"
        )
    with pytest.raises(ValueError, match="17 with vision_feature_select_strategy='full'"):
        MultimodalInput.from_processor(
            processor, image, QUESTION, vision_feature_select_strategy="full"
        )


def test_lookup_errors(processor, images) -> None:
    inp = MultimodalInput.from_processor(processor, images[1], QUESTION)
    with pytest.raises(
        ValueError,
        match="unknown segment 'answer'; valid names: system, image, user, question, last",
    ):
        inp.positions("answer")
    with pytest.raises(ValueError, match="item 1 does not exist"):
        inp.positions("image", item=1)
    with pytest.raises(ValueError, match="'window' does not occur in the prompt of item 0"):
        inp.find("window")
    with pytest.raises(ValueError, match="does not occur"):
        inp.find("")
    for box in [(0, 0, 89, 10), (-1, 0, 5, 5), (0, 40, 10, 49), (5, 5, 5, 9), (3, 9, 7, 2)]:
        with pytest.raises(ValueError, match="width 88 and height 48"):
            inp.patches_in_box(box)
    with pytest.raises(ValueError, match="four integers"):
        inp.patches_in_box((0.5, 0, 4, 4))
    with pytest.raises(ValueError, match="image 1 does not exist; this input has 1 image"):
        inp.patches_in_box((0, 0, 4, 4), image=1)


# --- devices, dtypes and model kwargs --------------------------------------------------------


def test_to_and_model_kwargs_feed_the_hf_model(tiny_llava_dir, processor, images) -> None:
    inp = MultimodalInput.from_processor(processor, [images[1], None], [QUESTION, LONG_QUESTION])
    assert set(inp.model_kwargs()) == {"input_ids", "attention_mask", "pixel_values"}  # LLaVA-1.5
    moved = inp.to("cpu", dtype=torch.float64)
    assert moved.pixel_values.dtype == torch.float64 and inp.pixel_values.dtype == torch.float32
    assert moved.input_ids.dtype == torch.long and moved is not inp
    assert_equal(moved.positions("question", 1), inp.positions("question", 1))
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    direct = processor(images=images[1], text=inp.prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**inp.model_kwargs()).logits, model(**direct).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


class SizeReportingProcessor:
    """A LlavaProcessor that also returns `image_sizes`, as LLaVA-NeXT's processor does."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __getattr__(self, name: str):
        return getattr(self.processor, name)

    def __call__(self, images=None, **kwargs):
        encoded = self.processor(images=images, **kwargs)
        encoded["image_sizes"] = torch.tensor([[image.height, image.width] for image in images])
        return encoded


def test_image_sizes_reach_the_model_only_when_the_processor_makes_them(processor, images) -> None:
    plain = MultimodalInput.from_processor(processor, images[1:], [QUESTION, QUESTION])
    assert plain.image_sizes.tolist() == [[48, 88], [80, 40]]
    assert "image_sizes" not in plain.model_kwargs()
    reporting = MultimodalInput.from_processor(
        SizeReportingProcessor(processor), images[1:], [QUESTION] * 2
    )
    assert_equal(reporting.model_kwargs()["image_sizes"].flatten(), plain.image_sizes.flatten())


def test_array_images_give_the_same_input(processor, images) -> None:
    from_pil = MultimodalInput.from_processor(processor, images[2], QUESTION)
    from_array = MultimodalInput.from_processor(processor, np.asarray(images[2]), QUESTION)
    assert torch.equal(from_array.input_ids, from_pil.input_ids)
    assert torch.equal(from_array.pixel_values, from_pil.pixel_values)
    assert from_array.image_geometry == from_pil.image_geometry
    assert from_array.image_sizes.tolist() == [[80, 40]]


# --- patches_in_box against the mask-image oracle --------------------------------------------


def has_resampling_tie(source: int, target: int) -> bool:
    """Whether resizing `source` -> `target` pixels puts a pixel centre exactly on a pixel border.

    PIL's box filter (the oracle below) breaks such exact ties inconsistently (in floating point
    it can drop a pixel or count it twice), so oracle images are sized to have none.
    """
    if source > target:  # shrinking: a source centre (i + 1/2) * target / source on a border
        return any(
            Fraction((2 * i + 1) * target, 2 * source).denominator == 1 for i in range(source)
        )
    if source < target:  # enlarging: a target centre (j + 1/2) * source / target on a border
        return any(
            Fraction((2 * j + 1) * source, 2 * target).denominator == 1 for j in range(target)
        )
    return False


def box_oracle(
    image_processor, size: tuple[int, int], boxes: list, patch_size: int = 14
) -> np.ndarray:
    """Which patches show each box: ``[n_boxes, rows, cols]`` booleans (the oracle of docs/semantics.md, "Boxes").

    Each box is painted white into a black mask of the original size; the mask and an all-black
    image go through the image processor (same padding, resizing and cropping) with
    normalisation off; a patch shows the box if any of its processed values differs from the
    all-black image's (this ignores the mean-colour padding, which both images share).
    Resampling is switched from bicubic to PIL's box filter: bicubic spreads a pixel ~2 pixels
    and rings, whereas the box filter puts each source pixel exactly where `patches_in_box`
    documents (every target pixel whose centre it covers, and the one holding its centre), so
    the comparison can be exact. The geometry (padding offsets, resized size, crop) is unchanged.
    """
    width, height = size
    masks = [np.zeros((height, width, 3), np.uint8)]
    for x0, y0, x1, y1 in boxes:
        mask = np.zeros((height, width, 3), np.uint8)
        mask[y0:y1, x0:x1] = 255
        masks.append(mask)
    pixels = image_processor(
        [Image.fromarray(mask) for mask in masks],
        resample=PILImageResampling.BOX,
        do_normalize=False,
        return_tensors="np",
    )["pixel_values"]
    changed = np.abs(pixels[1:] - pixels[:1]).max(axis=1) > 0  # [n_boxes, height, width]
    rows, cols = pixels.shape[2] // patch_size, pixels.shape[3] // patch_size
    changed = changed[:, : rows * patch_size, : cols * patch_size]
    return changed.reshape(len(boxes), rows, patch_size, cols, patch_size).any(axis=(2, 4))


def oracle_boxes(width: int, height: int, seed: int) -> list[tuple[int, int, int, int]]:
    """Every one-pixel-wide column and row, 1-pixel boxes at corners and edges, random boxes."""
    rng = np.random.default_rng(seed)
    boxes = [(x, 0, x + 1, height) for x in range(width)] + [
        (0, y, width, y + 1) for y in range(height)
    ]
    for x in (0, width // 2, width - 1):
        boxes += [(x, y, x + 1, y + 1) for y in (0, height // 2, height - 1)]
    for _ in range(60):
        box_width, box_height = (
            int(rng.geometric(p)) for p in rng.choice([0.5, 0.1, 0.03], size=2)
        )
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        boxes.append(
            (int(x0), int(y0), int(min(x0 + box_width, width)), int(min(y0 + box_height, height)))
        )
    return boxes + [(0, 0, width, height)]


def padded_processor(processor, pad_to_square: bool) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=make_image_processor(56, pad_to_square=pad_to_square),
        tokenizer=processor.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


ORACLE_CASES = {  # name: (width, height, pad to square)
    **{name: (width, height, True) for name, (width, height) in TEST_IMAGE_SIZES.items()},
    "small-enlarged": (
        23,
        12,
        True,
    ),  # 23 -> 56: enlarging, 5.75 pixels a patch; 5 + 6 rows padding
    "no-pad-cropped": (100, 64, False),  # 64 -> 56, 100 -> int(87.5) = 87, 15 columns cropped
}


def test_test_images_avoid_resampling_ties() -> None:
    for width, height, pad_to_square in ORACLE_CASES.values():
        geometry = ImageGeometry.from_image_processor(
            make_image_processor(56, pad_to_square=pad_to_square), (height, width), 14
        )
        for axis in (0, 1):
            assert not has_resampling_tie(geometry.padded_size[axis], geometry.resized_size[axis])
    assert has_resampling_tie(90, 56)  # e.g. a 90 x 50 image: pixel 22's centre maps to 14.0


@pytest.mark.parametrize("case", list(ORACLE_CASES))
def test_patches_in_box_matches_the_mask_oracle(processor, case) -> None:
    width, height, pad_to_square = ORACLE_CASES[case]
    case_processor = padded_processor(processor, pad_to_square)
    image = make_test_image(width, height, seed=7)
    inp = MultimodalInput.from_processor(case_processor, image, QUESTION)
    geometry = inp.image_geometry[0]
    if case == "no-pad-cropped":
        assert geometry.resized_size == (56, 87) and geometry.crop_offset == (0, 15)
    grid = inp.layout.patch_grid(0)
    boxes = oracle_boxes(width, height, seed=len(case))
    expected = box_oracle(case_processor.image_processor, (width, height), boxes)
    n_empty = 0
    for box, hit in zip(boxes, expected, strict=True):
        actual = inp.patches_in_box(box)
        assert_equal(actual, grid[torch.from_numpy(hit)])  # row-major = sorted positions
        n_empty += len(actual) == 0
    # Only the no-pad case crops pixels away (so some boxes hit nothing there).
    assert (n_empty > 0) == (case == "no-pad-cropped")


@pytest.mark.parametrize("case", ["wide", "tall"])
def test_strong_bicubic_response_lies_inside_patches_in_box(processor, case) -> None:
    """With llava's own bicubic resampling, every patch where the processed box reaches half
    intensity is one that `patches_in_box` reports (it reports more: the faint fringe too)."""
    width, height = TEST_IMAGE_SIZES[case]
    inp = MultimodalInput.from_processor(processor, make_test_image(width, height, 0), QUESTION)
    boxes = oracle_boxes(width, height, seed=1)[width + height :]
    masks = [np.zeros((height, width, 3), np.uint8) for _ in range(len(boxes) + 1)]
    for mask, (x0, y0, x1, y1) in zip(masks[1:], boxes, strict=True):
        mask[y0:y1, x0:x1] = 255
    pixels = processor.image_processor(
        [Image.fromarray(m) for m in masks], do_normalize=False, return_tensors="np"
    )["pixel_values"]
    strong = (pixels[1:] - pixels[:1]).max(axis=1) > 0.5
    strong = strong.reshape(len(boxes), 4, 14, 4, 14).any(axis=(2, 4))
    grid = inp.layout.patch_grid(0)
    for box, hit in zip(boxes, strong, strict=True):
        assert set(grid[torch.from_numpy(hit)].tolist()) <= set(inp.patches_in_box(box).tolist())
