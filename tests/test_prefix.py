"""The model's public prefix/suffix API, the sequence state on the hook context, the input
object's item and token methods, the model registry and the front door."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.ablations import attention_knockout, drop_tokens, zero_mlp
from mmlens.analysis import answer_token_ids, correct_answers
from mmlens.models import MODEL_TYPES
from mmlens.testing import make_test_image

N_LAYERS = 4
TOLERANCE = 1e-5
PROMPTS = ["What colour is the square on the left?", "Is the circle red?"]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint(n_layers=N_LAYERS, n_kv_heads=2))


@pytest.fixture(scope="module")
def images():
    return [make_test_image(88, 48, 0), make_test_image(40, 80, 1)]


@pytest.fixture(scope="module")
def inp(model, images):
    return model.prepare(images[0], PROMPTS[0])


@pytest.fixture(scope="module")
def batch(model, images):
    batch = model.prepare(images, PROMPTS)
    assert not bool(batch.attention_mask.all()), "the tests need a padded batch"
    return batch


def test_a_suffix_without_hooks_is_the_forward(model, inp):
    with torch.no_grad():
        full = model(inp)
        prefix = model.run_prefix(inp)
        start = int(inp.positions("question").min())
        suffix = model.run_suffix(prefix, start, n_variants=3, entry_layers=[0, 2, 3])
    assert torch.equal(prefix.logits, full)
    assert suffix.shape == (3, full.shape[1] - start, full.shape[2])
    assert (suffix - full[:, start:]).abs().max() < TOLERANCE


def test_a_prefix_of_the_last_logits_computes_only_the_last_row_at_the_end(model, inp):
    seen = {}

    def shape(tensor, hook):
        seen[hook.name] = (tuple(tensor.shape), hook.ctx["sequence"].query_positions.tolist())

    final = N_LAYERS - 1
    names = [f"blocks.{final}.{site}" for site in ("hook_resid_pre", "attn.hook_k", "attn.hook_z")]
    with torch.no_grad(), model.hooks(fwd_hooks=[(name, shape) for name in names]):
        prefix = model.run_prefix(inp, logits="last")
    with torch.no_grad():
        full = model(inp)
    assert (prefix.logits[:, 0] - full[:, -1]).abs().max() < TOLERANCE
    n, last = inp.input_ids.shape[1], int(inp.positions("last"))
    assert seen[names[0]][0][1] == n and seen[names[1]][0][1] == n  # every row gives keys
    assert seen[names[2]][0][1] == 1 and seen[names[2]][1] == [[last]]  # one query row
    assert prefix.cache.layers[final].keys.shape[1] == n


def test_variants_entering_at_their_layer_equal_full_runs(model, inp):
    """A variant's hooks act from its entry layer on and only on positions >= its start: its
    suffix equals a full run with those hooks. Variants may start at different positions."""
    image, last = inp.positions("image"), inp.positions("last")
    question_start = int(inp.positions("question").min())
    hooks = attention_knockout(image, last, [2, 3]) + zero_mlp(3, positions=last)
    with torch.no_grad():
        expected = model.run_with_hooks(inp, fwd_hooks=hooks)[0, -1]
        clean = model(inp)[0, -1]
        prefix = model.run_prefix(inp)
        starts = [int(last), question_start, int(last), question_start]
        suffix = model.run_suffix(
            prefix, starts, n_variants=4, entry_layers=[2, 0, 1, 2], fwd_hooks=hooks, only_last=True
        )
        late = model.run_suffix(
            prefix, int(last), entry_layers=[3], fwd_hooks=hooks, only_last=True
        )
    for variant in range(4):
        assert (suffix[variant] - expected).abs().max() < TOLERANCE, f"variant {variant}"
    # Entering after the knockout's first layer misses it: not the full run, nor the clean one.
    assert (late[0] - expected).abs().max() > 1e-3 and (late[0] - clean).abs().max() > 1e-3


def test_each_variant_sees_only_its_own_rows(model, inp):
    """Variants side by side in one sequence never attend to each other: a variant whose
    hooks change its rows leaves the other variants' logits equal to their runs alone."""
    start = int(inp.positions("question").min())

    def scramble_first_variant(resid, hook):
        state = hook.ctx["sequence"]
        return resid + 5.0 * (state.variant == 0)[..., None]

    hooks = [("blocks.1.hook_resid_pre", scramble_first_variant)]
    with torch.no_grad():
        prefix = model.run_prefix(inp)
        together = model.run_suffix(prefix, start, n_variants=3, fwd_hooks=hooks)
        alone = model.run_suffix(prefix, start)
    assert (together[0] - alone[0]).abs().max() > 1e-2
    for variant in (1, 2):
        assert (together[variant] - alone[0]).abs().max() < TOLERANCE


def test_suffix_rows_of_a_padded_batch_are_item_major(model, batch):
    start = batch.input_ids.shape[1] - 3
    with torch.no_grad():
        prefix = model.run_prefix(batch)
        suffix = model.run_suffix(prefix, start, n_variants=2, entry_layers=[1, 0])
        full = model(batch)
    for row in range(4):
        assert (suffix[row] - full[row // 2, start:]).abs().max() < TOLERANCE


def test_a_prefix_run_under_pruning_reuses_the_pruned_keys(model, inp):
    pruned = drop_tokens(inp.positions("image")[::2], 2)
    start = int(inp.positions("question").min())
    with torch.no_grad(), model.hooks(fwd_hooks=pruned):
        prefix = model.run_prefix(inp)
        suffix = model.run_suffix(prefix, start, entry_layers=[1])
        full = model(inp)
    n_suffix = inp.input_ids.shape[1] - start
    assert (suffix[0] - full[0, -n_suffix:]).abs().max() < TOLERANCE
    assert prefix.positions[3].shape[1] < inp.input_ids.shape[1]


def test_run_suffix_checks_its_arguments(model, inp):
    prefix = model.run_prefix(inp, logits=None)
    with pytest.raises(ValueError, match="entry_layers must give one layer"):
        model.run_suffix(prefix, 5, n_variants=2, entry_layers=[0])
    with pytest.raises(ValueError, match="entry_layers must give one layer"):
        model.run_suffix(prefix, 5, entry_layers=[N_LAYERS])
    with pytest.raises(ValueError, match="start 999 is not a position"):
        model.run_suffix(prefix, 999)
    with pytest.raises(ValueError, match="different starts can only return only_last"):
        model.run_suffix(prefix, [3, 5], n_variants=2)


def test_blocks_publish_their_sequence_state_on_the_hook_context(model, inp):
    seen = {}

    def read(tensor, hook):
        state = hook.ctx["sequence"]
        seen[state.layer] = (state.query_positions.clone(), state.key_positions.clone())

    image = inp.positions("image")
    hooks = drop_tokens(image, 2) + [
        (f"blocks.{layer}.hook_mlp_out", read) for layer in range(N_LAYERS)
    ]
    names = [f"blocks.{layer}.hook_positions" for layer in range(N_LAYERS)]
    with model.hooks(fwd_hooks=hooks):
        _, cache = model.run_with_cache(inp, names_filter=names)
    for layer in range(N_LAYERS):
        queries, keys = seen[layer]
        assert torch.equal(queries, cache[f"blocks.{layer}.hook_positions"])
        assert torch.equal(keys, queries)  # no cache: the keys are the queries
    assert not bool(torch.isin(seen[3][0], image).any())
    with pytest.raises(ValueError, match="carries no sequence state"):
        model.run_with_hooks(
            inp,
            fwd_hooks=[("hook_embed", lambda t, hook: mmlens.sequence.sequence_of(hook) and None)],
        )


def test_position_ids_with_a_leading_axis_pass_through_the_decoder(model, batch, monkeypatch):
    """The decoder indexes rotary ids along their last axis only (`position_ids`): ids with a
    leading axis, as a family with multi-axis ids gives them, reach the rotary embedding whole
    through pruning, a KV cache and prefix/suffix runs, with the same outputs."""
    image, last = batch.positions("image"), batch.positions("last")
    start = int(batch.positions("question", 0).min())

    def outputs():
        with torch.no_grad():
            pruned = model.run_with_hooks(batch, fwd_hooks=drop_tokens(image[::2], 2))
            tokens = model.generate(batch, max_new_tokens=3)
            with model.hooks(fwd_hooks=drop_tokens(image[:10], 1)):
                prefix = model.run_prefix(batch)
                suffix = model.run_suffix(
                    prefix,
                    start,
                    n_variants=2,
                    entry_layers=[1, 3],
                    fwd_hooks=zero_mlp(3, positions=last),
                    only_last=True,
                )
        return pruned, tokens, suffix

    expected = outputs()
    plain_ids, plain_rotary = type(model).position_ids, type(model.rotary).forward

    def position_ids(self, mask, **inputs):
        return plain_ids(self, mask, **inputs).repeat(2, 1, 1)  # [axis, batch, pos]

    def rotary(self, ids, dtype):
        assert ids.ndim == 3 and torch.equal(ids[0], ids[1]), ids.shape
        return plain_rotary(self, ids[1], dtype)

    # On the classes, so that undoing the patches leaves the shared model as it was.
    monkeypatch.setattr(type(model), "position_ids", position_ids)
    monkeypatch.setattr(type(model.rotary), "forward", rotary)
    for got, want in zip(outputs(), expected, strict=True):
        assert torch.equal(got, want)


# ------------------------------------------------------------------------------ inputs
def test_item_is_the_sample_prepared_alone(model, batch, images):
    for index in range(2):
        alone = model.prepare(images[index], PROMPTS[index])
        item = batch.item(index)
        assert torch.equal(item.input_ids, alone.input_ids)
        assert torch.equal(item.pixel_values, alone.pixel_values)
        for name in ("system", "image", "user", "question", "last"):
            assert torch.equal(item.positions(name), alone.positions(name)), name
        assert torch.equal(item.layout.position, alone.layout.position)
        assert torch.equal(
            item.patches_in_box((0, 0, 20, 20)), alone.patches_in_box((0, 0, 20, 20))
        )
        with torch.no_grad():
            assert (model(item)[0, -1] - model(alone)[0, -1]).abs().max() < TOLERANCE


def test_with_tokens_appends_after_the_prompt(model, inp):
    ids = answer_token_ids(model, inp, "red")
    forced = inp.with_tokens(ids)
    assert forced.input_ids.shape[1] == inp.input_ids.shape[1] + len(ids)
    assert torch.equal(forced.positions("last"), inp.positions("last"))
    expected = torch.cat((inp.input_ids, torch.tensor([ids])), dim=1)
    with torch.no_grad():
        logits = model(forced)
        direct = model(input_ids=expected, pixel_values=inp.pixel_values)
    assert torch.equal(logits, direct)


def test_correct_answers_is_the_greedy_first_subword(model, batch):
    with torch.no_grad():
        predicted = model(batch)[:, -1].argmax(-1)
    words = [model.tokenizer.decode([int(token)]).strip() or "x" for token in predicted]
    first_ids = [answer_token_ids(model, batch, word, item)[0] for item, word in enumerate(words)]
    expected = predicted == torch.tensor(first_ids)
    assert torch.equal(correct_answers(model, batch, words), expected)
    assert not bool(correct_answers(model, batch, ["zanzibarish", "zanzibarish"]).any())


# ----------------------------------------------------------------------- front door, registry
def test_the_registry_knows_every_model_type():
    assert MODEL_TYPES == {
        "llama": mmlens.HookedTransformer,
        "mistral": mmlens.HookedTransformer,
        "qwen2": mmlens.HookedTransformer,
        "llava": mmlens.HookedLlava,
        "llava_next": mmlens.HookedLlavaNext,
        "llava_onevision": mmlens.HookedLlavaOnevision,
        "instructblip": mmlens.HookedInstructBlip,
        "qwen2_vl": mmlens.HookedQwen2VL,
        "qwen2_5_vl": mmlens.HookedQwen25VL,
        "qwen3_vl": mmlens.HookedQwen3VL,
        "qwen_vl": mmlens.HookedQwenVL,
        "gemma3": mmlens.HookedGemma3,
        "internvl": mmlens.HookedInternVL,
    }


def test_a_base_class_loads_the_registered_subclass(tiny_next_checkpoint):
    folder = tiny_next_checkpoint()
    assert type(mmlens.HookedLlava.from_pretrained(folder)) is mmlens.HookedLlavaNext
    assert type(mmlens.HookedTransformer.from_pretrained(folder)) is mmlens.HookedLlavaNext


def test_import_mmlens_exposes_its_subpackages():
    for name in ("ablations", "analysis", "inputs", "models", "plot", "report", "zoo"):
        assert hasattr(mmlens, name), name
    assert mmlens.analysis.knockout_sweep is not None and mmlens.ablations.window is not None
