"""Bad input gives correct results or a clear error, and valid edge cases do not crash."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

import mmlens
from mmlens.ablations import (
    attention_knockout,
    drop_tokens,
    fastv,
    truncate_image_tokens,
    window,
)
from mmlens.analysis import (
    SweepError,
    attention_share,
    knockout_sweep,
    logit_lens,
)
from mmlens.inputs.images import as_image
from mmlens.testing import make_test_image

N_LAYERS = 4
QUESTION = "What colour is the square on the left?"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint(n_layers=N_LAYERS))


@pytest.fixture(scope="module")
def image():
    return make_test_image(88, 48)


@pytest.fixture(scope="module")
def inp(model, image):
    return model.prepare(image, QUESTION)


@pytest.fixture(scope="module")
def clean(model, inp):
    with torch.no_grad():
        return model(inp)


@pytest.fixture(autouse=True)
def no_hooks_left(model):
    """Every test leaves the model without hooks, whatever it raised."""
    yield
    assert not any(point._forward_hooks for point in model.hook_dict.values())
    assert model.context_level == 0


# ------------------------------------------------------------------------------- positions
def test_a_boolean_mask_is_read_as_a_mask(model, inp):
    is_image = inp.input_ids[0] == model.cfg.image_token_id
    last, layers = inp.positions("last"), window(1, 3, N_LAYERS)
    by_positions = model.run_with_hooks(
        inp, fwd_hooks=attention_knockout(inp.positions("image"), last, layers)
    )
    by_mask = model.run_with_hooks(inp, fwd_hooks=attention_knockout(is_image, last, layers))
    by_batch_mask = model.run_with_hooks(
        inp, fwd_hooks=attention_knockout(inp.input_ids == model.cfg.image_token_id, last, layers)
    )
    assert torch.equal(by_positions, by_mask) and torch.equal(by_positions, by_batch_mask)
    # {0, 1} would be the positions a mask read as integers gives: a different result.
    as_integers = model.run_with_hooks(
        inp, fwd_hooks=attention_knockout(torch.tensor([0, 1]), last, layers)
    )
    assert not torch.equal(by_mask, as_integers)

    by_name = knockout_sweep(model, inp, {"f": ("image", "last")}, 3, progress=False)
    by_mask = knockout_sweep(model, inp, {"f": (is_image, "last")}, 3, progress=False)
    assert by_name.p_new.tolist() == by_mask.p_new.tolist()


def test_a_segment_name_is_not_positions(inp):
    with pytest.raises(TypeError, match=r"'image' is a segment name.*inp.positions\('image'\)"):
        attention_knockout("image", inp.positions("last"), 1)


def test_heads_are_checked_before_indexing(model, inp):
    hooks = attention_knockout(inp.positions("image"), inp.positions("last"), 1, heads=[99])
    with pytest.raises(ValueError, match="head 99 does not exist: layer 1 has 4 heads"):
        model.run_with_hooks(inp, fwd_hooks=hooks)
    with pytest.raises(ValueError, match="non-negative"):
        attention_knockout(inp.positions("image"), inp.positions("last"), 1, heads=[-1])


@pytest.mark.parametrize("method", ["engine", "naive"])
@pytest.mark.parametrize("role", ["source", "target"])
def test_both_sweep_methods_reject_positions_outside_the_input(model, inp, method, role):
    n_positions = inp.input_ids.shape[1]
    outside = torch.tensor([n_positions + 3])
    flow = (outside, "last") if role == "source" else ("image", outside)
    with pytest.raises(
        SweepError,
        match=rf"sample 0: flow 'f': {role} includes position {n_positions + 3}, but the "
        rf"input has {n_positions} positions",
    ):
        knockout_sweep(model, inp, {"f": flow}, 3, method=method, progress=False)


# ------------------------------------------------------------------------------ user hooks
@pytest.mark.parametrize(
    "site, edit, problem",
    [
        ("blocks.1.hook_resid_post", lambda t: t[:, :1], r"shape \(1, 1, 64\)"),
        ("blocks.1.attn.hook_pattern", lambda t: t[:, :1], r"shape \(1, 1, \d+, \d+\)"),
        ("blocks.1.hook_mlp_out", lambda t: t.long(), "dtype torch.int64"),
        ("blocks.1.hook_mlp_out", lambda t: t.half(), "dtype torch.float16"),
    ],
)
def test_a_hook_returning_another_shape_or_dtype_is_named(model, inp, clean, site, edit, problem):
    def my_edit(tensor, hook):
        return edit(tensor)

    with pytest.raises(ValueError, match=rf"hook .*my_edit on '{site}' returned .*{problem}"):
        model.run_with_hooks(inp, fwd_hooks=[(site, my_edit)])
    with torch.no_grad():
        assert torch.equal(model(inp), clean)


def test_a_hook_returning_no_tensor_is_named(model, inp):
    def returns_a_list(tensor, hook):
        return [tensor]

    with pytest.raises(
        TypeError, match="returns_a_list on 'blocks.0.hook_mlp_out' returned a list"
    ):
        model.run_with_hooks(inp, fwd_hooks=[("blocks.0.hook_mlp_out", returns_a_list)])


def test_add_hook_with_a_typo_suggests_names(model):
    with pytest.raises(ValueError, match=r"did you mean 'blocks.0.hook_resid_post'"):
        model.add_hook("blocks.0.hook_resid_psot", lambda t, hook: t)


# ------------------------------------------------------------------- keywords, return types
def test_unknown_keywords_are_errors(model, inp):
    mask = inp.attention_mask
    with pytest.raises(ValueError, match=r"\['attention_masks'\]; did you mean 'attention_mask'"):
        model(input_ids=inp.input_ids, attention_masks=mask, pixel_values=inp.pixel_values)
    with pytest.raises(ValueError, match="attention_masks"):
        model.run_with_hooks(inp, fwd_hooks=[], attention_masks=mask)
    with pytest.raises(ValueError, match="attention_masks"):
        model.generate(inp, max_new_tokens=2, attention_masks=mask)
    with pytest.raises(ValueError, match="image_sizes"):
        model(inp.input_ids, image_sizes=torch.tensor([[48, 88]]))  # LLaVA-1.5 takes none
    with pytest.raises(ValueError, match="return_type='logit'"):
        model(inp, return_type="logit")


# ----------------------------------------------------------------------------------- images
def pixels(model, image) -> torch.Tensor:
    return model.prepare(image, QUESTION).pixel_values


def test_image_paths_are_opened(model, image, inp, tmp_path):
    path = tmp_path / "image.png"
    image.save(path)
    assert torch.equal(pixels(model, str(path)), inp.pixel_values)
    assert torch.equal(pixels(model, path), inp.pixel_values)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.prepare(tmp_path / "missing.png", QUESTION)


def test_urls_are_never_fetched(model, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ValueError, match="is a URL; mmlens never fetches"):
        model.prepare("https://example.com/cat.png", QUESTION)


def test_float_images_in_unit_range_are_the_8_bit_image(model, image, inp):
    unit = np.asarray(image).astype(np.float32) / 255
    assert torch.equal(pixels(model, unit), inp.pixel_values)
    assert torch.equal(pixels(model, torch.from_numpy(unit)), inp.pixel_values)
    with pytest.raises(ValueError, match=r"must hold values in \[0, 1\] \(got \[0, 255\]\)"):
        model.prepare(np.asarray(image).astype(np.float32), QUESTION)


def test_sixteen_bit_images_are_scaled_not_clipped(model, image, inp):
    gray = image.convert("L")
    gray_sixteen = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert gray_sixteen.mode.startswith("I;16")
    assert torch.equal(pixels(model, gray_sixteen), pixels(model, gray))
    rgb_sixteen = np.asarray(image).astype(np.uint16) * 257
    assert torch.equal(pixels(model, rgb_sixteen), inp.pixel_values)


def test_as_image_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"int32 image with values in \[0, 300\]"):
        as_image(np.array([[0, 300]], dtype=np.int32))
    with pytest.raises(TypeError, match="cannot read an image of type dict"):
        as_image({})


# ------------------------------------------------------------------- inputs of other models
def test_an_input_prepared_by_another_model_is_named(tiny_checkpoint, model, inp):
    other = mmlens.from_pretrained(tiny_checkpoint(n_layers=N_LAYERS, image_size=28))
    with pytest.raises(ValueError, match="prepared with a different processor"):
        other(inp)
    with pytest.raises(ValueError, match="image token id is 3, this model's"):
        model(dataclasses.replace(inp, image_token_id=3))
    too_large = torch.tensor([[1, model.cfg.d_vocab + 5]])
    with pytest.raises(ValueError, match=f"token id {model.cfg.d_vocab + 5} is outside"):
        model(too_large)
    same_files = mmlens.from_pretrained(tiny_checkpoint(n_layers=N_LAYERS))
    assert torch.equal(same_files(inp), model(inp))


# ---------------------------------------------------------------- valid input, no crashes
@pytest.mark.parametrize("mode", ["drop", "mask"])
def test_keeping_every_image_token_is_a_no_op(model, inp, clean, mode):
    image = inp.positions("image")
    for hooks in (
        fastv(2, 1.0, image_positions=image, mode=mode),
        truncate_image_tokens(2, keep=len(image), image_positions=image, mode=mode),
    ):
        # Same tokens, same numbers (the ranking hook reads patterns, so attention runs
        # explicitly instead of through SDPA: equal up to float rounding).
        logits = model.run_with_hooks(inp, fwd_hooks=hooks)
        assert logits.shape == clean.shape
        assert (logits - clean).abs().max() < 1e-5


def test_the_sweep_composes_with_pruning_and_ranked_truncation(model, inp):
    image, last = inp.positions("image"), inp.positions("last")
    flows = {"Q→Last": ("question", "last"), "Image→Question": ("image", "question")}
    with model.hooks(fwd_hooks=drop_tokens(image[::2], 3)):
        engine = knockout_sweep(model, inp, flows, 3, progress=False)
        naive = knockout_sweep(model, inp, flows, 3, method="naive", progress=False)
    assert ((engine.p_new - naive.p_new).abs() / naive.p_new).max() < 1e-5
    # The naive loop under the hook is the hand-made computation.
    pruned = drop_tokens(image[::2], 3)
    with torch.no_grad():
        p_base = model.run_with_hooks(inp, fwd_hooks=pruned)[0, -1].softmax(-1)
        answer = int(p_base.argmax())
        knocked = attention_knockout(inp.positions("question"), last, window(1, 3, N_LAYERS))
        p_new = model.run_with_hooks(inp, fwd_hooks=pruned + knocked)[0, -1].softmax(-1)[answer]
    first = naive[(naive.flow == "Q→Last") & (naive.layer == 1)].iloc[0]
    assert first.p_base == pytest.approx(float(p_base[answer]), abs=1e-6)
    assert first.p_new == pytest.approx(float(p_new), abs=1e-6)

    # FastV ranks at layer 1 from the last row's attention: windows starting at 0 or 1 change
    # what the whole sequence keeps (the engine runs those in full), later ones do not.
    flows["Image→Last"] = ("image", "last")
    with model.hooks(fwd_hooks=fastv(2, 0.5, image_positions=image)):
        engine = knockout_sweep(model, inp, flows, 3, progress=False)
        naive = knockout_sweep(model, inp, flows, 3, method="naive", progress=False)
    assert ((engine.p_new - naive.p_new).abs() / naive.p_new).max() < 1e-5
    assert set(engine.window_start) == {0, 1, 2}


def test_lens_and_share_refuse_pruned_runs(model, inp):
    image = inp.positions("image")
    with model.hooks(fwd_hooks=drop_tokens(image, 2)):
        _, cache = model.run_with_cache(inp)
    for analysis in (lambda: logit_lens(cache, inp, [0]), lambda: attention_share(cache, inp)):
        with pytest.raises(ValueError, match=r"blocks.2.* positions but the input has .* pruned"):
            analysis()
    with model.hooks(fwd_hooks=drop_tokens(image, 2)):
        for analysis in (lambda: logit_lens(model, inp, [0]), lambda: attention_share(model, inp)):
            with pytest.raises(ValueError, match="pruned"):
                analysis()


def test_a_failing_sample_is_named_and_earlier_rows_are_kept(model, inp):
    other = model.prepare(make_test_image(40, 80, 1), "Is the circle red?")
    flows = {"Image→Last": ("image", "last"), "Related→Question": ("related_patches", "question")}
    boxes = [[(0, 0, 30, 20)], []]
    with pytest.raises(SweepError, match=r"sample 1: flow 'Related→Question'.*boxes") as error:
        knockout_sweep(model, [inp, other], flows, 3, boxes=boxes, progress=False)
    first_alone = knockout_sweep(model, inp, flows, 3, boxes=boxes[:1], progress=False)
    partial = error.value.partial_result
    assert partial.drop(columns="sample").equals(first_alone.drop(columns="sample"))
    assert set(partial["sample"]) == {0}


# ------------------------------------------------------------------ arguments that name no result
def test_generation_arguments_are_checked(model, inp):
    with pytest.raises(ValueError, match=r"max_new_tokens must be an integer >= 0, got -1"):
        model.generate(inp, max_new_tokens=-1)
    for temperature in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
            model.generate(inp, max_new_tokens=1, do_sample=True, temperature=temperature)
    assert model.generate(inp, max_new_tokens=0).shape == inp.input_ids.shape


def test_stop_at_layer_is_checked_and_counts_from_the_end_when_negative(model, inp):
    for bad in (N_LAYERS + 1, -N_LAYERS - 1, 1.5):
        with pytest.raises(ValueError, match=rf"stop_at_layer={bad!r} is outside -4..4"):
            model(inp, stop_at_layer=bad)
    _, cache = model.run_with_cache(inp, names_filter=f"blocks.{N_LAYERS - 1}.hook_resid_pre")
    last = cache[f"blocks.{N_LAYERS - 1}.hook_resid_pre"]
    torch.testing.assert_close(model(inp, stop_at_layer=-1), last)
    torch.testing.assert_close(model(inp, stop_at_layer=N_LAYERS - 1), last)


@pytest.mark.parametrize("box", [(0, 0, float("nan"), 10), (0, 0, float("inf"), 10)])
def test_nan_and_infinite_boxes_are_named(inp, box):
    with pytest.raises(ValueError, match=r"box must be four finite integers .*NaN and infinite"):
        inp.patches_in_box(box, rule="geometric")


def test_a_boolean_mask_of_the_wrong_length_is_refused(model, inp):
    n = inp.input_ids.shape[1]
    last = inp.positions("last")
    for length in (n - 3, n + 2):
        mask = torch.zeros(length, dtype=torch.bool)
        mask[1] = True
        with pytest.raises(
            ValueError,
            match=rf"source is a boolean mask of length {length}, but the input has {n} positions",
        ):
            model.run_with_hooks(inp, fwd_hooks=attention_knockout(mask, last, [1]))
        with pytest.raises(
            SweepError,
            match=rf"source: a boolean mask of length {length} for an input of {n} positions",
        ):
            knockout_sweep(model, inp, {"f": (mask, "last")}, 3, progress=False)
    # the right length still works, also while generating (the keys grow past the mask)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[1] = True
    with model.hooks(fwd_hooks=attention_knockout(mask, last, [1])):
        assert model.generate(inp, max_new_tokens=3).shape[1] > n


@pytest.mark.parametrize(
    "question, error, message",
    [
        ("", ValueError, r"prompt 0 is empty \(''\); pass the question's text"),
        ("  \n", ValueError, r"prompt 0 is empty"),
        (None, TypeError, r"the prompt must be a string \(or a list of strings\), got NoneType"),
        ([QUESTION, None], TypeError, r"prompt 1 must be a string, got NoneType"),
    ],
)
def test_empty_or_missing_questions_are_refused(model, image, question, error, message):
    images = [image, image] if isinstance(question, list) else image
    with pytest.raises(error, match=message):
        model.prepare(images, question)


def test_images_without_pixels_or_with_four_channel_arrays_are_refused(model):
    with pytest.raises(ValueError, match=r"the image is 0x0: it has no pixels"):
        model.prepare(Image.new("RGB", (0, 0)), QUESTION)
    with pytest.raises(ValueError, match=r"image array has shape \(0, 8, 3\): it has no pixels"):
        model.prepare(np.zeros((0, 8, 3), np.uint8), QUESTION)
    rgba = np.zeros((8, 8, 4), np.uint8)
    with pytest.raises(
        ValueError,
        match=r"has 4 channels; pass 1 or 3 .*drop the alpha channel \(array\[\.\.\., :3\]\)",
    ):
        model.prepare(rgba, QUESTION)


def test_a_prompt_past_the_position_limit_is_warned_about(model, image):
    limit = model.cfg.max_position_embeddings
    long_question = " ".join(["word"] * (limit + 10))
    with pytest.warns(
        UserWarning, match=rf"more than the model's max_position_embeddings \({limit}\)"
    ):
        model.prepare(image, long_question)


def test_a_box_outside_the_image_in_a_sweep_names_the_sample_and_box(model, image):
    inputs = [model.prepare(image, QUESTION), model.prepare(image, QUESTION)]
    boxes = [[(0, 0, 10, 10)], [(0, 0, 10, 10), (80, 0, 200, 10)]]
    with pytest.raises(
        SweepError,
        match=r"sample 1: flow 'f': source: box \(80, 0, 200, 10\) must satisfy .* width 88 and height 48",
    ):
        knockout_sweep(model, inputs, {"f": ("related_patches", "last")}, 3, boxes=boxes,
                       patch_rule="geometric", progress=False)  # fmt: skip


def test_rgba_images_drop_their_alpha_under_the_papers_presets(model):
    """Original LLaVA opens images with ``.convert("RGB")`` (alpha dropped); Hugging Face's
    processor blends them onto white. Under a paper's preset mmlens does what LLaVA does."""
    from mmlens.presets import CROSS_MODAL_FLOW

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (48, 88, 4), dtype=np.uint8)
    pixels[..., 3] = rng.integers(0, 256, (48, 88))
    rgba = Image.fromarray(pixels, "RGBA")
    dropped = rgba.convert("RGB")
    under_preset = model.prepare(rgba, QUESTION, preset=CROSS_MODAL_FLOW).pixel_values
    expected = model.prepare(dropped, QUESTION, preset=CROSS_MODAL_FLOW).pixel_values
    assert torch.equal(under_preset, expected)
    blended = model.prepare(rgba, QUESTION).pixel_values  # no preset: the processor's blend
    assert not torch.equal(blended, model.prepare(dropped, QUESTION).pixel_values)
