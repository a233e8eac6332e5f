"""Several images in one prompt, for LLaVA and LLaVA-NeXT: parity with Hugging Face (logits, every
residual, greedy generation) on interleaved prompts in a padded batch, segments per image, boxes
per image, knockout between images, and errors that lead somewhere."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

import mmlens
from mmlens.ablations import attention_knockout
from mmlens.testing import assert_matches_hf, make_test_image

PROMPTS = ["Is the <image> brighter than the <image>?", "What is in the picture?"]


@pytest.fixture(scope="module", params=["llava", "llava_next"])
def models(request, tiny_checkpoint, tiny_next_checkpoint):
    if request.param == "llava":
        folder, hf_class = tiny_checkpoint(), LlavaForConditionalGeneration
    else:
        folder, hf_class = tiny_next_checkpoint(), LlavaNextForConditionalGeneration
    return hf_class.from_pretrained(folder, dtype=torch.float32).eval(), mmlens.from_pretrained(
        folder
    )


@pytest.fixture(scope="module")
def images():
    return [make_test_image(56, 40, 1), make_test_image(40, 72, 2), make_test_image(64, 64, 3)]


@pytest.fixture(scope="module")
def inp(models, images):
    _, model = models
    return model.prepare([images[:2], images[2]], PROMPTS)


def test_interleaved_prompts_match_hf(models, inp):
    hf, model = models
    assert inp.n_images == 3 and inp.image_items == [0, 0, 1]
    assert_matches_hf(hf, model, inp)


def test_greedy_generation_matches_hf(models, inp):
    hf, model = models
    with torch.no_grad():
        expected = hf.generate(**inp.model_kwargs(), max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(inp, max_new_tokens=6), expected)


def test_segments_per_image(models, inp):
    _, model = models
    first, second, third = (inp.positions("image", image=k) for k in range(3))
    assert len(first) and len(second) and len(third)
    assert torch.equal(torch.cat([first, second]), inp.positions("image", item=0))
    assert torch.equal(third, inp.positions("image", item=1))
    assert first.max() < second.min()  # in the order the prompt names them
    ids = inp.input_ids[0]
    assert (ids[torch.cat([first, second])] == inp.image_token_id).all()
    # The question's text tokens surround and separate the images.
    question = inp.positions("question")
    assert question.min() < first.min() and first.max() < question[question > first.max()].min()
    assert question.max() > second.max()
    assert not torch.isin(question, inp.positions("image")).any()
    text = model.tokenizer.decode(ids[question]).replace(" ", "")
    assert text == PROMPTS[0].replace("<image>", "").replace(" ", "")
    assert torch.isin(question, inp.positions("user")).all()
    with pytest.raises(ValueError, match="belongs to batch item 0, not 1"):
        inp.positions("image", item=1, image=0)
    with pytest.raises(ValueError, match="image 3 does not exist"):
        inp.positions("image", image=3)


def test_boxes_map_to_their_own_image(inp, images):
    width, height = images[1].size
    patches = inp.patches_in_box((0, 0, width, height), image=1)
    assert torch.isin(patches, inp.positions("image", image=1)).all()
    assert not torch.isin(patches, inp.positions("image", image=0)).any()


def test_knockout_between_images(models, inp):
    _, model = models
    first, second = inp.positions("image", image=0), inp.positions("image", image=1)
    seen = {}

    def keep(pattern, hook):
        seen["pattern"] = pattern.detach().clone()

    hooks = attention_knockout(first, second, [0]) + [("blocks.0.attn.hook_pattern", keep)]
    with torch.no_grad():
        knocked = model.run_with_hooks(inp.item(0), fwd_hooks=hooks)
        clean, cache = model.run_with_cache(inp.item(0), names_filter="blocks.1.hook_resid_pre")
    pattern = seen["pattern"][0]
    assert pattern[:, second][:, :, first].abs().max() == 0  # image 1 cannot see image 0
    assert pattern[:, second].sum(-1).sub(1).abs().max() < 1e-5  # renormalised over the rest
    assert (knocked - clean).abs().max() > 1e-4


def test_errors_say_how_to_give_several_images(models, images):
    _, model = models
    with pytest.raises(ValueError, match="write one '<image>' per image in the question"):
        model.prepare(images[:2], "Which is brighter?")
    with pytest.raises(ValueError, match="places 2 image"):
        model.prepare(images[0], "Is <image> like <image>?")
    with pytest.raises(ValueError, match="one entry per prompt"):
        model.prepare(images, PROMPTS)
