"""The original InternVL2 release format (``InternVLChatModel`` with an InternLM2 decoder), read
natively, against a transcription of the release's code (tests/internvl_reference.py) on a
random checkpoint in that layout (`build_tiny_internvl_release`): the prompt's ids (InternLM2's
SentencePiece tokenizer, the ``internlm2-chat`` conversation, ``chat()``'s image tokens) and
pixels (``dynamic_preprocess`` and its transform); logits and every residual within 1e-4 in a
left-padded batch of two images with different tile counts; greedy generation; none of the
folder's Python runs."""

from __future__ import annotations

import pytest
import torch
from internvl_reference import InternLM2Tokenizer, Reference, chat_query, load_image

import mmlens
from mmlens.ablations import attention_knockout, drop_tokens
from mmlens.models.internvl import HookedInternVL
from mmlens.testing import build_tiny_internvl_release, make_test_image

TOLERANCE = 1e-4
TOKENS_PER_CROP = 16  # 56 px crops of 7 px patches, pixel-shuffled 2 x 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_internvl_release(tmp_path_factory.mktemp("internvl2"))


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return Reference(folder)


@pytest.fixture(scope="module")
def images():
    return {"wide": make_test_image(90, 40, 2), "square": make_test_image(100, 100, 1)}


def test_loads_natively_as_internvl(model):
    assert type(model) is HookedInternVL and model.default_template == "internlm2_chat"
    assert model.cfg.decoder_model_type == "llama" and model.cfg.n_key_value_heads == 2
    assert model.cfg.rotary_limit == 512  # dynamic rotary scaling from there on
    assert model.cfg.connector.norm_type == "rms_norm" and model.cfg.connector.qk_norm
    assert not model.cfg.vision.has_ln_post


def test_prompt_ids_and_pixels_are_the_releases(folder, model, images):
    questions = ["What colour is the star?", "Why?"]
    inp = model.prepare([images["wide"], images["square"]], questions)
    tokenizer = InternLM2Tokenizer(folder)
    crops = [load_image(images[name], 56) for name in ("wide", "square")]
    assert [len(c) for c in crops] == [3, 5] and inp.pixel_rows == [3, 5]
    torch.testing.assert_close(inp.pixel_values, torch.cat(crops), atol=1e-6, rtol=0)
    for item, (question, pixels) in enumerate(zip(questions, crops, strict=True)):
        expected = tokenizer.encode(chat_query(question, [len(pixels)], TOKENS_PER_CROP))
        real = inp.attention_mask[item].bool()
        assert inp.input_ids[item][real].tolist() == expected
    assert model.to_string(inp.input_ids[0, inp.positions("question", 0)]) == questions[0]
    assert model.to_string(inp.input_ids[0, inp.positions("last", 0)]) == "\n"
    text = inp.prompts[0]
    assert text.startswith("<|im_start|>system\n你是由上海人工智能实验室")
    assert text.endswith("<|im_end|><|im_start|>user\n<IMG_CONTEXT>\n" + questions[0]
                         + "<|im_end|><|im_start|>assistant\n")  # fmt: skip


def test_tokenizer_round_trips_and_keeps_the_release_ids(folder, model):
    tokenizer, ours = InternLM2Tokenizer(folder), model.tokenizer
    text = "<|im_start|>user\nIs the  red car left of 3 dogs? 你好<|im_end|>"
    assert ours(text)["input_ids"] == tokenizer.encode(text)
    plain = "Is the  red car left of 3 dogs? 你好"
    assert ours.decode(ours(plain)["input_ids"], skip_special_tokens=True) == plain
    # After a special token the piece's dummy prefix decodes as a space (the release's slow
    # tokenizer decodes each piece apart and drops it): decoding only, ids are the release's.
    assert ours.decode(ours(text)["input_ids"]).startswith("<s><|im_start|> user\n")
    assert ours.convert_tokens_to_ids("<IMG_CONTEXT>") == model.cfg.image_token_id
    assert model.cfg.eos_token_id == [ours.convert_tokens_to_ids("<|im_end|>"), 2]


def assert_matches_reference(reference, model, inp) -> float:
    with torch.no_grad():
        logits, states = reference.forward(
            inp.input_ids, inp.attention_mask, inp.pixel_values, model.cfg.image_token_id
        )
        ours, cache = model.run_with_cache(inp)
    real = inp.attention_mask.bool()
    differences = [(logits - ours)[real].abs().max()]
    for layer in range(model.cfg.n_layers):
        differences.append(
            (states[layer] - cache[f"blocks.{layer}.hook_resid_pre"])[real].abs().max()
        )
    differences.append((states[-1] - cache["ln_final.hook_normalized"])[real].abs().max())
    assert ours.std() > 0.5, "random checkpoint too flat for parity to mean anything"
    largest = float(max(differences))
    assert largest < TOLERANCE, differences
    return largest


def test_padded_batch_of_two_tile_counts_matches_the_release(reference, model, images):
    inp = model.prepare(
        [images["wide"], images["square"]], ["What colour is the star in the corner?", "Why?"]
    )
    assert not inp.attention_mask.bool().all()
    assert_matches_reference(reference, model, inp)


def test_a_text_only_item_matches_the_release(reference, model, images):
    inp = model.prepare([None, images["wide"]], ["Hello there, who are you?", "Why?"])
    assert_matches_reference(reference, model, inp)


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_matches_the_release(reference, model, images, batch):
    prompts = ["What colour is the star?", "Why?"][:batch]
    inp = model.prepare([images["wide"], images["square"]][:batch], prompts)
    ours = model.generate(inp, max_new_tokens=5, stop_at_eos=False)
    with torch.no_grad():
        theirs = reference.greedy(
            inp.input_ids, inp.attention_mask, inp.pixel_values, model.cfg.image_token_id, 5
        )
    assert torch.equal(ours, theirs)


def test_dropping_the_image_equals_knocking_it_out(model, images):
    inp = model.prepare(images["wide"], "What colour is the star?")
    image = inp.positions("image")
    after = torch.arange(int(image[-1]) + 1, inp.input_ids.shape[1])
    dropped = model.run_with_hooks(inp, fwd_hooks=drop_tokens(image, from_layer=1))
    knocked = model.run_with_hooks(
        inp, fwd_hooks=attention_knockout(image, after, range(1, model.cfg.n_layers))
    )
    torch.testing.assert_close(dropped[:, -1], knocked[:, -1], atol=1e-5, rtol=0)


def test_positions_past_the_dynamic_scaling_length_are_refused(model):
    with pytest.raises(ValueError, match="dynamic rotary scaling"):
        model.position_ids(torch.ones(1, 600, dtype=torch.long))
    assert model.position_ids(torch.ones(1, 512, dtype=torch.long)).max() == 511


def test_none_of_the_folders_code_runs(folder):
    # The builder's .py files raise when imported; loading read every file natively.
    assert (folder / "modeling_internvl_chat.py").read_text().startswith("raise")
    assert type(mmlens.from_pretrained(folder)) is HookedInternVL


def test_an_unsupported_release_says_what_is_missing(tmp_path, folder):
    import json
    import shutil

    shutil.copytree(folder, tmp_path / "v1-5")
    config = json.loads((tmp_path / "v1-5" / "config.json").read_text())
    (tmp_path / "v1-5" / "config.json").write_text(json.dumps({**config, "ps_version": "v3"}))
    with pytest.raises(NotImplementedError, match="ps_version='v3'.*reads 'v1'"):
        mmlens.from_pretrained(tmp_path / "v1-5")
    phi = {**config, "llm_config": {**config["llm_config"], "architectures": ["Phi3ForCausalLM"]}}
    (tmp_path / "v1-5" / "config.json").write_text(json.dumps(phi))
    with pytest.raises(NotImplementedError, match="Phi3ForCausalLM decoder"):
        mmlens.from_pretrained(tmp_path / "v1-5")


def test_the_internvl2_5_conversation(tmp_path, images):
    folder = build_tiny_internvl_release(tmp_path, template="internvl2_5")
    model = mmlens.from_pretrained(folder)
    assert model.default_template == "internvl2_5"
    inp = model.prepare(images["wide"], "Why?")
    expected = chat_query("Why?", [3], TOKENS_PER_CROP, template="internvl2_5")
    assert inp.input_ids[0].tolist() == InternLM2Tokenizer(folder).encode(expected)
    assert inp.prompts[0] == expected.replace(
        "<img>" + "<IMG_CONTEXT>" * 48 + "</img>", "<IMG_CONTEXT>"
    )


@pytest.fixture(scope="module")
def v1_folder(tmp_path_factory):
    """InternVL-Chat-V1-5's form: the v1 pixel shuffle (each crop's tokens column by column)."""
    return build_tiny_internvl_release(tmp_path_factory.mktemp("internvl-v1-5"), ps_version="v1")


def test_the_v1_pixel_shuffle_matches_the_release(v1_folder, images):
    model, reference = mmlens.from_pretrained(v1_folder), Reference(v1_folder)
    assert model.cfg.connector.column_major_tokens
    inp = model.prepare(
        [images["wide"], images["square"]], ["What colour is the star in the corner?", "Why?"]
    )
    assert_matches_reference(reference, model, inp)
    one = model.prepare(images["wide"], "What colour is the star?")
    ours = model.generate(one, max_new_tokens=5, stop_at_eos=False)
    with torch.no_grad():
        theirs = reference.greedy(
            one.input_ids, one.attention_mask, one.pixel_values, model.cfg.image_token_id, 5
        )
    assert torch.equal(ours, theirs)


def test_the_v1_layout_puts_each_cell_where_its_token_is(v1_folder, folder, images):
    """The same image under v1 and v2 (2 tiles and the thumbnail, 4 x 4 tokens each): the cell
    that v2's k-th token of a crop shows is shown by v1's token (k % 4) * 4 + k // 4 of that
    crop, and a box selects the v1 tokens of the cells it selects under v2."""
    v1, v2 = mmlens.from_pretrained(v1_folder), mmlens.from_pretrained(folder)
    column, row = (model.prepare(images["wide"], "Why?") for model in (v1, v2))
    assert torch.equal(column.input_ids, row.input_ids)

    def cells(inp):
        layout = inp.layout
        keys = zip(layout.tile.tolist(), layout.row.tolist(), layout.col.tolist(), strict=True)
        return dict(zip(keys, layout.position.tolist(), strict=True))

    by_cell_v1, by_cell_v2 = cells(column), cells(row)
    assert by_cell_v1.keys() == by_cell_v2.keys() and len(by_cell_v1) == 3 * TOKENS_PER_CROP
    first = int(row.positions("image")[0])
    for cell, position in by_cell_v2.items():
        crop, k = divmod(position - first, TOKENS_PER_CROP)
        assert by_cell_v1[cell] == first + crop * TOKENS_PER_CROP + (k % 4) * 4 + k // 4
    box = (0, 0, 30, 20)
    selected = set(row.patches_in_box(box).tolist())
    expected = sorted(by_cell_v1[cell] for cell, p in by_cell_v2.items() if p in selected)
    assert sorted(column.patches_in_box(box).tolist()) == expected != sorted(selected)
