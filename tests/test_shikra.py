"""Shikra and the LLaVA v0 releases: the original LLaVA layout's v0 form (one linear projector,
``<im_start>`` + ``<im_patch>`` tokens + ``<im_end>`` from the release's vocabulary, a 224 px
tower, each release's conversation) on random releases written in that layout
(`build_tiny_v0_release`), against Hugging Face's LLaVA given the same weights (the linear
projector as `linear_1`, `linear_2` the identity, a "linear" activation); and the delta form they
are published in (`mmlens apply-delta`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import mmlens
from mmlens.__main__ import main
from mmlens.models.delta import apply_delta
from mmlens.presets import REDUNDANCY_TO_RELEVANCE
from mmlens.testing import assert_matches_hf, make_test_image
from mmlens.testing.original import build_tiny_v0_release, split_into_delta

QUESTIONS = ["What colour is the star?", "Is there a door?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_v0_release(tmp_path_factory.mktemp("shikra") / "shikra-7b")


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def images():
    return [make_test_image(88, 48, seed=1), make_test_image(40, 80, seed=2)]


def hf_llava_of(folder, model) -> LlavaForConditionalGeneration:
    """Hugging Face's LLaVA computing what the release computes: its decoder and tower, the
    linear projector as `linear_1` with `linear_2` the identity after a "linear" (identity)
    activation, and ``<im_patch>`` as the image token."""
    raw = json.loads((folder / "config.json").read_text())
    text = {k: v for k, v in raw.items() if not k.startswith("mm_")}
    text.update(model_type="llama", architectures=None)
    config = LlavaConfig(
        text_config=LlamaConfig(**text).to_dict(),
        vision_config=CLIPVisionConfig.from_pretrained(raw["mm_vision_tower"]).to_dict(),
        image_token_index=model.cfg.image_token_id,
        vision_feature_layer=raw["mm_vision_select_layer"],
        vision_feature_select_strategy="default",
        projector_hidden_act="linear",
        tie_word_embeddings=False,
    )
    hf = LlavaForConditionalGeneration(config).eval()
    state = {}
    for name, tensor in torch.load(folder / "pytorch_model.bin", weights_only=True).items():
        if name.startswith("model.mm_projector."):
            state["model.multi_modal_projector.linear_1." + name.rsplit(".", 1)[1]] = tensor
        elif name == "lm_head.weight":
            state[name] = tensor
        else:
            state["model.language_model." + name.removeprefix("model.")] = tensor
    from safetensors.torch import load_file

    tower = load_file(f"{raw['mm_vision_tower']}/model.safetensors")
    for name, tensor in tower.items():
        state["model.vision_tower." + name.removeprefix("vision_model.")] = tensor
    d_model = config.text_config.hidden_size
    state["model.multi_modal_projector.linear_2.weight"] = torch.eye(d_model)
    state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(d_model)
    hf.load_state_dict(state, strict=True)
    return hf


@pytest.fixture(scope="module")
def hf(folder, model):
    return hf_llava_of(folder, model)


def test_loads_with_its_linear_projector_patch_tokens_and_conversation(model, images):
    assert not hasattr(model.projector, "linear_2")
    assert model.tokenizer.convert_ids_to_tokens(model.cfg.image_token_id) == "<im_patch>"
    assert model.prepare_defaults == {"tokenization": "hf", "template": "shikra"}
    assert model.cfg.vision_feature_layers == [-2] and model.cfg.vision.image_size == 56
    inp = model.prepare(images[0], QUESTIONS[0])
    assert inp.prompts[0].endswith(
        "questions. USER: <im_start><im_patch><im_end> What colour is the star? ASSISTANT:"
    )
    # The release's rule: the prompt tokenised whole, <im_patch> repeated once per patch.
    text = inp.prompts[0].replace("<im_patch>", "<im_patch>" * 16)
    assert inp.input_ids[0].tolist() == model.tokenizer(text)["input_ids"]
    image = inp.positions("image")
    assert len(image) == 16 and image.tolist() == list(range(int(image[0]), int(image[0]) + 16))
    assert model.to_str_tokens(inp.input_ids[0, [image[0] - 1, image[-1] + 1]]) == [
        "<im_start>",
        "<im_end>",
    ]
    assert model.to_string(inp.input_ids[0, inp.positions("question")]) == QUESTIONS[0]


def test_matches_hf_in_a_padded_batch_and_generates_the_same(hf, model, images):
    inp = model.prepare(images, QUESTIONS)
    assert_matches_hf(hf, model, inp)
    one = model.prepare(images[0], QUESTIONS[0])
    with torch.no_grad():
        expected = hf.generate(**one.model_kwargs(), max_new_tokens=5, do_sample=False)
        generated = model.generate(one, max_new_tokens=5, stop_at_eos=False)
    assert torch.equal(
        generated[:, one.input_ids.shape[1] :], expected[:, one.input_ids.shape[1] :]
    )


def test_llava_v0_releases_take_their_conversation(tmp_path, images):
    model = mmlens.from_pretrained(build_tiny_v0_release(tmp_path / "llava-v0", kind="llava_v0"))
    inp = model.prepare(images[0], QUESTIONS[0])
    assert inp.prompts[0] == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions.###Human: "
        "<im_start><im_patch><im_end>\nWhat colour is the star?###Assistant:"
    )
    assert model.to_string(inp.input_ids[0, inp.positions("question")]) == QUESTIONS[0]


def test_the_papers_preset_keeps_the_releases_conversation(model, images):
    inp = model.prepare(images[0], "Is it red?", preset=REDUNDANCY_TO_RELEVANCE)
    assert inp.settings["template"] == "shikra" and inp.settings["tokenization"] == "hf"
    REDUNDANCY_TO_RELEVANCE.check_input(model, inp)


def test_the_delta_release_applies_to_the_release(folder, model, images, tmp_path):
    base, delta = split_into_delta(folder, tmp_path / "published")
    assert (
        not (delta / "pytorch_model.bin").read_bytes()
        == (folder / "pytorch_model.bin").read_bytes()
    )
    main(
        ["apply-delta", "--base", str(base), "--delta", str(delta), "--out", str(tmp_path / "out")]
    )
    rebuilt = mmlens.from_pretrained(tmp_path / "out")
    inp = model.prepare(images[0], QUESTIONS[0])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(inp), model(inp), atol=1e-5, rtol=0)
    with pytest.raises(FileExistsError, match="already holds weights"):
        apply_delta(base, delta, tmp_path / "out")
    with pytest.raises(ValueError, match="is not a delta release over|does not fit the base"):
        apply_delta(delta, base, tmp_path / "swapped")


def test_the_truncation_experiment_runs_on_it(folder, tmp_path):
    result = mmlens.run(
        "truncation", folder, "shapes:3", tmp_path / "run", preset="redundancy_to_relevance",
        correct_only=False, layers=[0], keep=0, progress=False,
    )  # fmt: skip
    assert result["sample_id"].nunique() == 3 and len(result) > 0


def test_loading_prints_no_transformers_notes_on_what_mmlens_reads_itself(folder, caplog):
    from transformers.utils import logging as hf_logging

    from mmlens.loading import quiet_release_noise

    note = "You are using a model of type `shikra` to instantiate a model of type ``."
    logger = hf_logging.get_logger("transformers.models.llava")
    with caplog.at_level("WARNING"):
        mmlens.from_pretrained(folder)
        # Without the filter, reading the tokenizer logs `note` (and more) five times.
        assert "model of type" not in caplog.text
        with quiet_release_noise():  # any other message still goes out
            logger.warning("a real problem")
            logger.warning(note)
        assert [record.getMessage() for record in caplog.records] == ["a real problem"]
        logger.warning(note)  # the filter is gone after the block
        assert caplog.records[-1].getMessage() == note
