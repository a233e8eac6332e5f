"""Ablations against independent implementations: HF's own LLaVA with an attention function,
registered through HF's attention interface, that adds the edges inside HF's model."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, LlavaForConditionalGeneration

import mmlens
from mmlens.ablations import (
    attention_knockout,
    attention_knockout_post_softmax,
    drop_tokens,
    fastv,
    truncate_image_tokens,
    window,
    zero_attention,
    zero_heads,
    zero_mlp,
)
from mmlens.sequence import KVCache
from mmlens.testing import make_test_image

N_LAYERS = 4
# layer -> list of (sources, targets or None for every query, heads or None, keep_self)
HF_EDGES: dict[int, list[tuple]] = {}


def edge_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention (no padding) that blocks the edges in HF_EDGES inside HF's model."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if module.is_causal:
        n_q, n_k = scores.shape[-2:]
        query_pos = torch.arange(n_k - n_q, n_k)[:, None]  # with a KV cache, queries are last
        key_pos = torch.arange(n_k)[None, :]
        blocked = (key_pos > query_pos).expand(scores.shape[1], -1, -1).clone()
        for sources, targets, heads, keep_self in HF_EDGES.get(module.layer_idx, []):
            edges = torch.isin(key_pos, sources) & (
                True if targets is None else torch.isin(query_pos, targets)
            )
            if keep_self:
                edges = edges & (key_pos != query_pos)
            head_mask = torch.zeros(scores.shape[1], dtype=torch.bool)
            head_mask[heads if heads is not None else slice(None)] = True
            blocked |= edges[None] & head_mask[:, None, None]
        scores = scores.masked_fill(blocked, float("-inf"))
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
    return (probs @ value).transpose(1, 2).contiguous(), probs


AttentionInterface.register("mmlens_test_edges", edge_attention)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return tiny_checkpoint(n_layers=N_LAYERS, n_kv_heads=2)


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(folder):
    return LlavaForConditionalGeneration.from_pretrained(
        folder, attn_implementation="mmlens_test_edges"
    ).eval()


@pytest.fixture(scope="module")
def inp(model):
    return model.prepare(make_test_image(88, 48), "What colour is the square on the left?")


@pytest.fixture
def hf_edges():
    HF_EDGES.clear()
    yield HF_EDGES
    HF_EDGES.clear()


def hf_logits(hf, inp):
    with torch.no_grad():
        return hf(**inp.model_kwargs()).logits


def test_window_is_centred_and_clipped():
    assert list(window(0, 9, 32)) == [0, 1, 2, 3, 4]
    assert list(window(16, 9, 32)) == list(range(12, 21))
    assert list(window(31, 9, 32)) == list(range(27, 32))
    assert list(window(5, 4, 32)) == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="not a layer"):
        window(32, 9, 32)


def test_hf_edge_attention_without_edges_is_hf(model, hf, inp, hf_edges):
    assert (hf_logits(hf, inp) - model(inp)).abs().max() < 1e-5


FLOWS = {
    "Image->Last": ("image", "last"),
    "Question->Last": ("question", "last"),
    "Last->Last": ("last", "last"),
    "Image->Question": ("image", "question"),
}


@pytest.mark.parametrize("flow", list(FLOWS))
@pytest.mark.parametrize("heads", [None, [1, 2]])
def test_knockout_equals_hf_with_edges_inside_its_attention(model, hf, inp, hf_edges, flow, heads):
    source, target = (inp.positions(name) for name in FLOWS[flow])
    layers = window(1, 3, N_LAYERS)
    for layer in layers:
        hf_edges[layer] = [(source, target, heads, False)]
    expected = hf_logits(hf, inp)
    logits = model.run_with_hooks(inp, fwd_hooks=attention_knockout(source, target, layers, heads))
    assert (logits - expected).abs().max() < 1e-5
    assert (logits - model(inp)).abs().max() > 1e-4, "the knockout should change something"


def test_two_knockouts_on_overlapping_layers_compose(model, hf, inp, hf_edges):
    image, question, last = (inp.positions(n) for n in ("image", "question", "last"))
    hf_edges[1] = [(image, last, None, False)]
    hf_edges[2] = [(image, last, None, False), (question, last, None, False)]
    hf_edges[3] = [(question, last, None, False)]
    hooks = attention_knockout(image, last, [1, 2]) + attention_knockout(question, last, [2, 3])
    assert (model.run_with_hooks(inp, fwd_hooks=hooks) - hf_logits(hf, inp)).abs().max() < 1e-5


def test_knockout_during_generation_equals_hf(model, hf, inp, hf_edges):
    image, last = inp.positions("image"), inp.positions("last")
    for layer in range(N_LAYERS):
        hf_edges[layer] = [(image, last, None, False)]
    with torch.no_grad():
        expected = hf.generate(**inp.model_kwargs(), max_new_tokens=6, do_sample=False)
    with model.hooks(fwd_hooks=attention_knockout(image, last, range(N_LAYERS))):
        tokens = model.generate(inp, max_new_tokens=6)
    assert torch.equal(tokens, expected)


def test_post_softmax_knockout_zeroes_without_renormalising(model, inp):
    image, last = inp.positions("image"), inp.positions("last")
    name = "blocks.2.attn.hook_pattern"
    with model.hooks(fwd_hooks=attention_knockout_post_softmax(image, last, 2)):
        _, cache = model.run_with_cache(inp, names_filter=name)
    _, clean = model.run_with_cache(inp, names_filter=name)
    row, clean_row = cache[name][0, :, last[0]], clean[name][0, :, last[0]]
    assert row[:, image].abs().max() == 0
    assert torch.allclose(row.sum(-1), 1 - clean_row[:, image].sum(-1), atol=1e-6)


def test_knockout_errors(model, inp):
    image, last = inp.positions("image"), inp.positions("last")
    with pytest.raises(ValueError, match="source is empty"):
        attention_knockout([], last, 1)
    with pytest.raises(ValueError, match="layers is empty"):
        attention_knockout(image, last, [])
    with pytest.raises(
        ValueError, match="target position 3 .* no|every key that target position 3"
    ):
        attention_knockout(range(0, 4), [3, 10], 1)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        model.run_with_hooks(inp, fwd_hooks=attention_knockout(image, last, [1, 9]))
    n_positions = inp.input_ids.shape[1]
    with pytest.raises(ValueError, match=rf"input has {n_positions} positions"):
        model.run_with_hooks(inp, fwd_hooks=attention_knockout(image, [n_positions + 5], 1))
    assert all(not hp._forward_hooks for hp in model.hook_dict.values()), (
        "no hook may survive an error"
    )


def test_row_emptied_by_padding_is_an_error(model):
    batch = model.prepare(
        [make_test_image(56, 56)] * 2, ["What colour is it?", "Is there a red square left of it?"]
    )
    first_real = int((batch.attention_mask[0] == 0).sum())
    assert first_real > 0
    hooks = attention_knockout(
        [first_real], [first_real], 1
    )  # item 0's first token sees only itself
    with pytest.raises(ValueError, match=rf"position {first_real} \(batch item 0"):
        model.run_with_hooks(batch, fwd_hooks=hooks)


def test_zeroing(model, inp):
    question = inp.positions("question")
    with model.hooks(fwd_hooks=zero_mlp([1, 2], positions=question)):
        _, cache = model.run_with_cache(inp, names_filter=lambda n: n.endswith("hook_mlp_out"))
    _, clean = model.run_with_cache(inp, names_filter=lambda n: n.endswith("hook_mlp_out"))
    for layer in range(N_LAYERS):
        out = cache[f"blocks.{layer}.hook_mlp_out"][0]
        if layer in (1, 2):
            assert out[question].abs().max() == 0
            others = torch.ones(out.shape[0], dtype=torch.bool)
            others[question] = False
            assert out[others].abs().min() > 0
    assert torch.equal(cache["blocks.0.hook_mlp_out"], clean["blocks.0.hook_mlp_out"])

    # Zeroing every head's z is zeroing the attention output (no output bias in Llama).
    all_heads = zero_heads(2, range(model.cfg.n_heads))
    assert torch.allclose(
        model.run_with_hooks(inp, fwd_hooks=all_heads),
        model.run_with_hooks(inp, fwd_hooks=zero_attention(2)),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="head 40 does not exist"):
        model.run_with_hooks(inp, fwd_hooks=zero_heads(2, [40]))


# ---------------------------------------------------------------------- pruning
@pytest.mark.parametrize("from_layer", [1, 3])
def test_dropping_all_image_tokens_equals_masking_them_in_hf(model, hf, inp, hf_edges, from_layer):
    image = inp.positions("image")
    for layer in range(from_layer, N_LAYERS):
        hf_edges[layer] = [(image, None, None, True)]
    expected = hf_logits(hf, inp)[:, -1]
    dropped = model.run_with_hooks(
        inp, fwd_hooks=truncate_image_tokens(from_layer, keep=0, image_positions=image)
    )
    masked = model.run_with_hooks(inp, fwd_hooks=drop_tokens(image, from_layer, mode="mask"))
    assert dropped.shape[1] == inp.input_ids.shape[1] - len(image), "the sequence really shrinks"
    assert (dropped[:, -1] - masked[:, -1]).abs().max() < 1e-5
    assert (masked[:, -1] - expected).abs().max() < 1e-5


def test_positions_hooks_say_which_tokens_survive(model, inp):
    image = inp.positions("image")
    with model.hooks(fwd_hooks=drop_tokens(image[::2], from_layer=2)):
        _, cache = model.run_with_cache(
            inp, names_filter=lambda n: n.endswith("hook_positions") or n.endswith("resid_post")
        )
    n = inp.input_ids.shape[1]
    survivors = torch.tensor([p for p in range(n) if p not in set(image[::2].tolist())])
    assert torch.equal(cache["blocks.1.hook_positions"][0], torch.arange(n))
    assert torch.equal(cache["blocks.2.hook_positions"][0], survivors)
    assert cache["blocks.3.hook_resid_post"].shape[1] == len(survivors)


@pytest.mark.parametrize("rank", ["last", "mean"])
def test_truncation_keeps_the_most_attended_image_tokens(model, inp, rank):
    image, keep, layer = inp.positions("image"), 5, 2
    _, clean = model.run_with_cache(inp, names_filter=f"blocks.{layer - 1}.attn.hook_pattern")
    received = clean[f"blocks.{layer - 1}.attn.hook_pattern"][0].mean(0)  # [q, k], mean over heads
    received = received[-1] if rank == "last" else received.mean(0)
    expected_kept = (
        image[received[image].argsort(descending=True, stable=True)[:keep]].sort().values
    )

    hooks = truncate_image_tokens(layer, keep, rank, image_positions=image)
    with model.hooks(fwd_hooks=hooks):
        logits, cache = model.run_with_cache(inp, names_filter=f"blocks.{layer}.hook_positions")
    survivors = cache[f"blocks.{layer}.hook_positions"][0]
    assert torch.equal(survivors[torch.isin(survivors, image)], expected_kept)
    masked = model.run_with_hooks(
        inp, fwd_hooks=truncate_image_tokens(layer, keep, rank, image_positions=image, mode="mask")
    )
    keep_rows = torch.isin(torch.arange(inp.input_ids.shape[1]), survivors)
    assert (logits[0] - masked[0, keep_rows]).abs().max() < 1e-5


def test_fastv_and_knockout_compose_with_pruning(model, inp):
    image, question, last = (inp.positions(n) for n in ("image", "question", "last"))
    knockouts = attention_knockout(question, last, [2, 3]) + attention_knockout(image, question, 3)
    dropped = model.run_with_hooks(inp, fwd_hooks=fastv(2, 0.5, image_positions=image) + knockouts)
    masked = model.run_with_hooks(
        inp, fwd_hooks=fastv(2, 0.5, image_positions=image, mode="mask") + knockouts
    )
    assert dropped.shape[1] == inp.input_ids.shape[1] - len(image) // 2
    assert (dropped[:, -1] - masked[:, -1]).abs().max() < 1e-5
    assert (
        dropped[:, -1]
        - model.run_with_hooks(inp, fwd_hooks=fastv(2, 0.5, image_positions=image))[:, -1]
    ).abs().max() > 1e-4


def test_drop_then_generate_equals_masked_generation_and_the_cache_shrinks(model, inp):
    image = inp.positions("image")
    with model.hooks(fwd_hooks=fastv(2, 0.25, image_positions=image)):
        dropped = model.generate(inp, max_new_tokens=6, stop_at_eos=False)
        cache = KVCache.empty(N_LAYERS, 1, inp.input_ids.device)
        model(inp, past_kv_cache=cache)
    with model.hooks(fwd_hooks=fastv(2, 0.25, image_positions=image, mode="mask")):
        masked = model.generate(inp, max_new_tokens=6, stop_at_eos=False)
    assert torch.equal(dropped, masked)
    n, n_dropped = inp.input_ids.shape[1], len(image) - round(0.25 * len(image))
    assert [entry.keys.shape[1] for entry in cache.layers] == [n, n, n - n_dropped, n - n_dropped]


def test_padded_batch_pruning_matches_each_item_alone(model):
    prompts = ["What colour is it?", "Is there a red square left of the blue circle?"]
    images = [make_test_image(56, 56, 1), make_test_image(40, 80, 2)]
    batch = model.prepare(images, prompts)
    per_item = [batch.positions("image", item=i) for i in range(2)]
    logits = model.run_with_hooks(batch, fwd_hooks=drop_tokens(per_item, 2))
    for item in range(2):
        alone = model.prepare(images[item], prompts[item])
        expected = model.run_with_hooks(alone, fwd_hooks=drop_tokens(alone.positions("image"), 2))
        assert (logits[item, -1] - expected[0, -1]).abs().max() < 1e-5


def test_pruning_errors(model, inp):
    image = inp.positions("image")
    with pytest.raises(ValueError, match="layer must be >= 1"):
        truncate_image_tokens(0, 4, image_positions=image)
    with pytest.raises(ValueError, match="only 16 image tokens"):
        model.run_with_hooks(inp, fwd_hooks=truncate_image_tokens(2, 100, image_positions=image))
    with pytest.raises(ValueError, match="mode must be"):
        drop_tokens(image, 2, mode="shrink")
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        model.run_with_hooks(inp, fwd_hooks=drop_tokens(image, 7))
    batch = model.prepare([make_test_image(56, 56)] * 2, ["What colour is it?", "Is it red?"])
    uneven = [batch.positions("image", item=0), batch.positions("image", item=1)[:3]]
    with pytest.raises(ValueError, match="different lengths"):
        model.run_with_hooks(batch, fwd_hooks=drop_tokens(uneven, 1))
    with pytest.raises(ValueError, match="pruned"):
        model.run_with_hooks(inp, fwd_hooks=drop_tokens(image, 1), return_type="loss")
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())
