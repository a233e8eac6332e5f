"""Paper presets (`mmlens.presets`): what `prepare(preset=...)` builds, the windows per checkpoint,
and the analyses taking their settings from a preset (and refusing inputs made without it)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mmlens
from mmlens.analysis import knockout_sweep, logit_lens
from mmlens.inputs.templates import CROSS_MODAL_SUFFIX
from mmlens.presets import CROSS_MODAL_FLOW, PRESETS, REDUNDANCY_TO_RELEVANCE_CAM
from mmlens.testing import make_test_image
from mmlens.zoo.shapes import generate

QUESTION = "What colour is the door?"


@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint())


@pytest.fixture(scope="module")
def shapes():
    return mmlens.load("tiny-shapes"), generate(2, seed=3)


def test_prepare_with_the_cross_modal_preset(llava):
    image = make_test_image(60, 30)
    inp = llava.prepare(image, QUESTION, preset=CROSS_MODAL_FLOW)
    explicit = llava.prepare(
        image,
        QUESTION,
        template="vicuna_v1",
        suffix=CROSS_MODAL_SUFFIX,
        image_mode="pad",
        tokenization="llava",
    )
    assert torch.equal(inp.input_ids, explicit.input_ids)
    assert torch.equal(inp.pixel_values, explicit.pixel_values)
    assert inp.settings == dict(
        template="vicuna_v1",
        suffix=CROSS_MODAL_SUFFIX,
        image_mode="pad",
        anyres="hf",
        tokenization="llava",
    )
    assert inp.prompts[0].endswith(f"USER: <image>\n{QUESTION}{CROSS_MODAL_SUFFIX} ASSISTANT:")
    question = llava.tokenizer.decode(inp.input_ids[0, inp.positions("question")]).strip()
    assert question == QUESTION  # the suffix is not part of the question segment
    # A keyword given beside the preset wins.
    assert llava.prepare(
        image, QUESTION, preset=CROSS_MODAL_FLOW, image_mode="crop"
    ).image_mode == ("crop")


@pytest.mark.parametrize(
    ("family", "template"),
    [("vicuna", "vicuna_v1"), ("mistral", "mistral_instruct"), ("llama3", "llava_llama_3")],
)
def test_next_checkpoints_get_their_original_conversation_and_anyres(
    tiny_next_checkpoint, family, template
):
    model = mmlens.from_pretrained(tiny_next_checkpoint(family=family))
    inp = model.prepare(make_test_image(20, 14), QUESTION, preset=CROSS_MODAL_FLOW)
    assert inp.settings["template"] == template
    assert (inp.anyres, inp.image_mode, inp.tokenization) == ("llava", None, "llava")
    assert len(inp.positions("image")) == 26  # the original canvas (tests/test_original_llava.py)


def test_an_organism_keeps_the_template_it_was_trained_with(shapes):
    model, samples = shapes
    inp = model.prepare(samples[0].image, samples[0].question, preset=CROSS_MODAL_FLOW)
    assert inp.template == "llava_v1" == model.default_template


@pytest.mark.parametrize(
    ("family", "name", "window"),
    [
        (mmlens.HookedLlava, "llava-hf/llava-1.5-13b-hf", 9),
        (mmlens.HookedLlava, "/models/llava-1.5-7b-hf", 7),
        (mmlens.HookedLlava, "liuhaotian/llava-v1.5-13b", 9),
        (mmlens.HookedLlavaNext, "llava-hf/llava-v1.6-vicuna-7b-hf", 7),
        (mmlens.HookedLlavaNext, "/data/llama3-llava-next-8b-hf", 7),
        (mmlens.HookedLlava, "tiny-shapes", 9),
        (mmlens.HookedLlava, "llava-hf/llava-v1.6-vicuna-7b-hf", 9),  # another family's window
    ],
)
def test_the_cross_modal_window_follows_the_checkpoint(family, name, window):
    """The windows are declared by each family (`paper_window_sizes`) and read by the preset."""
    model = SimpleNamespace(
        cfg=SimpleNamespace(model_name=name), paper_window_sizes=family.paper_window_sizes
    )
    assert CROSS_MODAL_FLOW.window_size(model) == window


def test_presets_are_listed_by_name():
    assert PRESETS["cross_modal_flow"] is CROSS_MODAL_FLOW
    assert REDUNDANCY_TO_RELEVANCE_CAM.image_mode == "squash"
    assert set(PRESETS) == {
        "cross_modal_flow",
        "redundancy_to_relevance",
        "redundancy_to_relevance_cam",
    }


def test_knockout_sweep_takes_the_presets_flows_window_and_patch_rule(shapes):
    model, samples = shapes
    inputs = [model.prepare(s.image, s.question, preset=CROSS_MODAL_FLOW) for s in samples]
    boxes = [s.boxes for s in samples]
    result = knockout_sweep(
        model, inputs, preset=CROSS_MODAL_FLOW, boxes=boxes, centres=[1, 3], progress=False
    )
    explicit = knockout_sweep(
        model,
        inputs,
        dict(CROSS_MODAL_FLOW.flows),
        window_size=9,
        boxes=boxes,
        patch_rule="mask",
        centres=[1, 3],
        progress=False,
    )
    assert result.equals(explicit)
    assert set(result.flow) == set(CROSS_MODAL_FLOW.flows)
    assert result.attrs["preset"] == "cross_modal_flow"
    assert result.attrs["window_size"] == 9 and result.attrs["patch_rule"] == "mask"
    assert result.attrs["inputs"]["image_mode"] == "pad"
    assert result.attrs["inputs"]["tokenization"] == "llava"


def test_the_presets_patch_rule_reaches_the_related_patches(llava):
    # Under the painted-mask rule a 1-px-wide box leaves no red pixel after resizing (88 x 48 ->
    # 56 x 56): "related patches" is empty, which the sweep reports; the geometric rule finds some.
    image, thin_box = make_test_image(88, 48), (30, 5, 31, 45)
    inp = llava.prepare(image, QUESTION, preset=CROSS_MODAL_FLOW)
    flows = {"related": ("related_patches", "question")}
    geometric = knockout_sweep(
        llava, inp, flows, 1, boxes=[[thin_box]], patch_rule="geometric", progress=False
    )
    assert len(geometric) == llava.cfg.n_layers
    with pytest.raises(mmlens.analysis.SweepError, match="flow 'related'.*empty"):
        knockout_sweep(
            llava, inp, flows, 1, boxes=[[thin_box]], preset=CROSS_MODAL_FLOW, progress=False
        )


def test_analyses_refuse_inputs_made_without_the_preset(shapes):
    model, samples = shapes
    plain = model.prepare(samples[0].image, samples[0].question)
    with pytest.raises(
        ValueError, match="tokenization='hf' \\(the preset's: 'llava'\\), suffix=''"
    ):
        knockout_sweep(model, plain, preset=CROSS_MODAL_FLOW, boxes=[samples[0].boxes])
    with pytest.raises(ValueError, match="not prepared with preset 'cross_modal_flow'"):
        logit_lens(model, plain, [0], preset=CROSS_MODAL_FLOW)


def test_logit_lens_takes_the_presets_norm(shapes):
    model, samples = shapes
    inp = model.prepare(samples[0].image, samples[0].question, preset=CROSS_MODAL_FLOW)
    result = logit_lens(model, inp, [0, 1], preset=CROSS_MODAL_FLOW)
    explicit = logit_lens(model, inp, [0, 1], apply_final_norm="last_layer")
    assert result.probability.tolist() == explicit.probability.tolist()
    assert result.attrs["apply_final_norm"] == "last_layer"
    assert result.attrs["preset"] == "cross_modal_flow"
    assert logit_lens(model, inp, [0]).attrs["apply_final_norm"] is True
