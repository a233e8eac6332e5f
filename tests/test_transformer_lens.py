"""TransformerLens conventions for circuit work: weights per query head (grouped-query attention
expanded), stacked model-level weights, QK/OV as FactoredMatrix, per-head results, and
decompositions that sum to the residual stream and the logits at every position, image positions
included. Every check compares TL-style expressions with an explicit computation from the cached
activations of a real forward pass."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import FactoredMatrix
from transformer_lens.utilities import get_act_name

import mmlens
from mmlens.testing import build_tiny_instructblip, build_tiny_llava_onevision
from mmlens.zoo.shapes import generate

TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=["mha", "gqa"])
def model(request, tiny_checkpoint):
    """A random LLaVA whose decoder has 4 query heads and 4 (MHA) or 2 (GQA) key/value heads."""
    n_kv_heads = 4 if request.param == "mha" else 2
    return mmlens.from_pretrained(tiny_checkpoint(n_heads=4, n_kv_heads=n_kv_heads))


@pytest.fixture(scope="module")
def run(model, images):
    inp = model.prepare(images[:2], ["What is in the picture?", "Describe it."])
    model.set_use_attn_result(True)
    try:
        logits, cache = model.run_with_cache(inp)
    finally:
        model.set_use_attn_result(False)
    return inp, logits, cache


def test_weights_have_one_entry_per_query_head(model):
    cfg = model.cfg
    n_layers, n_heads, d_model, d_head = cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head
    for name in ("W_Q", "W_K", "W_V"):
        assert getattr(model, name).shape == (n_layers, n_heads, d_model, d_head)
    assert model.W_O.shape == (n_layers, n_heads, d_head, d_model)
    assert model._W_K.shape == (n_layers, cfg.n_key_value_heads, d_model, d_head)
    for name in ("b_Q", "b_K", "b_V"):
        assert getattr(model, name).shape == (n_layers, n_heads, d_head)
    assert model.W_in.shape == model.W_gate.shape == (n_layers, d_model, cfg.d_mlp)
    assert model.W_out.shape == (n_layers, cfg.d_mlp, d_model)
    assert model.b_in.shape == (n_layers, cfg.d_mlp) and model.b_out.shape == (n_layers, d_model)
    # Query head h reads key/value head h // group, as the forward pass pairs them.
    group = n_heads // cfg.n_key_value_heads
    for head in range(n_heads):
        assert torch.equal(model.W_K[1, head], model._W_K[1, head // group])
        assert torch.equal(model.blocks[1].attn.W_V[head], model.blocks[1].attn._W_V[head // group])
    assert torch.equal(model.W_in[0], model.blocks[0].mlp.up_proj.weight.T)


def test_keys_and_values_from_the_weights_are_what_each_head_reads(model, run):
    inp, _, cache = run
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    for layer in range(model.cfg.n_layers):
        normed = cache[f"blocks.{layer}.ln1.hook_normalized"]
        for head in range(model.cfg.n_heads):
            key = normed @ model.W_K[layer, head] + model.b_K[layer, head]
            value = normed @ model.W_V[layer, head] + model.b_V[layer, head]
            query = normed @ model.W_Q[layer, head] + model.b_Q[layer, head]
            read = head // group
            torch.testing.assert_close(key, cache[get_act_name("k", layer)][:, :, read])
            torch.testing.assert_close(value, cache[get_act_name("v", layer)][:, :, read])
            torch.testing.assert_close(query, cache[get_act_name("q", layer)][:, :, head])


def test_qk_circuit_gives_each_heads_score_at_distance_zero(model, run):
    """Rotary positions cancel between a query and a key at the same position, so the diagonal
    of the attention scores is x @ QK[h] @ x / sqrt(d_head): a wrong head pairing fails here."""
    _, _, cache = run
    assert isinstance(model.QK, FactoredMatrix) and isinstance(model.OV, FactoredMatrix)
    for layer in range(model.cfg.n_layers):
        normed = cache[f"blocks.{layer}.ln1.hook_normalized"]
        scores = cache[get_act_name("attn_scores", layer)]
        real = torch.arange(normed.shape[1])
        for head in range(model.cfg.n_heads):
            qk = model.QK[layer, head].AB
            torch.testing.assert_close(
                qk, model.W_Q[layer, head] @ model.W_K[layer, head].T, rtol=0, atol=TOLERANCE
            )
            expected = torch.einsum("bpd,de,bpe->bp", normed, qk, normed) / model.cfg.d_head**0.5
            diagonal = scores[:, head, real, real]
            ok = diagonal.isfinite()  # padded positions are masked
            torch.testing.assert_close(diagonal[ok], expected[ok], rtol=1e-4, atol=1e-4)


def test_ov_circuit_and_per_head_results(model, run):
    _, _, cache = run
    for layer in range(model.cfg.n_layers):
        normed = cache[f"blocks.{layer}.ln1.hook_normalized"]
        pattern = cache[get_act_name("pattern", layer)]
        result = cache[get_act_name("result", layer)]  # [batch, pos, head, d_model]
        torch.testing.assert_close(
            result.sum(2) + model.b_O[layer], cache[get_act_name("attn_out", layer)],
            rtol=0, atol=TOLERANCE,
        )  # fmt: skip
        for head in range(model.cfg.n_heads):
            written = (
                normed @ model.OV[layer, head].AB + model.b_V[layer, head] @ model.W_O[layer, head]
            )
            expected = torch.nan_to_num(pattern[:, head]) @ written
            torch.testing.assert_close(result[:, :, head], expected, rtol=1e-4, atol=1e-4)
    stacked = cache.stack_head_results(layer=-1)
    assert stacked.shape[0] == model.cfg.n_layers * model.cfg.n_heads


def test_decompositions_sum_to_the_residual_stream_at_every_position(model, run):
    inp, logits, cache = run
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    image = inp.positions("image", item=0)
    assert len(image) > 0
    # The embedding term is the projected image features at image positions.
    image_embeds = cache["hook_image_embeds"]
    torch.testing.assert_close(cache["hook_embed"][0, image], image_embeds[0], rtol=0, atol=0)
    assert not torch.equal(cache["hook_token_embed"][0, image], cache["hook_embed"][0, image])
    for stack in (
        cache.decompose_resid(),
        cache.get_full_resid_decomposition(expand_neurons=False),
        cache.get_full_resid_decomposition(expand_neurons=True),
    ):
        torch.testing.assert_close(stack.sum(0), final, rtol=0, atol=TOLERANCE)
        error = (stack.sum(0) - final).abs()
        assert error[0, image].max() < TOLERANCE
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(
            cache.decompose_resid(layer=layer).sum(0), cache[get_act_name("resid_pre", layer)],
            rtol=0, atol=TOLERANCE,
        )  # fmt: skip


def test_logit_attributions_sum_to_the_logits(model, run):
    inp, logits, cache = run
    token = int(logits[0, -1].argmax())
    stack = cache.get_full_resid_decomposition(expand_neurons=False)
    attributions = cache.logit_attrs(stack, tokens=token)  # [component, batch, pos]
    real = inp.attention_mask.bool()
    torch.testing.assert_close(
        attributions.sum(0)[real], logits[..., token][real], rtol=0, atol=TOLERANCE
    )


def test_transformer_lens_logit_lens_on_an_mmlens_cache(model, run):
    _, logits, cache = run
    lens = cache.logit_lens()  # the last position of every item (prompts are left-padded)
    assert lens.labels[-1] == "final_post" and len(lens.labels) == model.cfg.n_layers + 1
    torch.testing.assert_close(lens.readout.values[-1], logits[:, -1], rtol=1e-4, atol=1e-4)


def test_hook_result_is_opt_in(model, images):
    inp = model.prepare(images[0], "Why?")
    with pytest.raises(ValueError, match="set_use_attn_result"):
        model.run_with_cache(inp, names_filter="blocks.0.attn.hook_result")
    _, cache = model.run_with_cache(inp)
    assert "blocks.0.attn.hook_result" not in cache.cache_dict
    model.set_use_attn_result(True)
    try:
        with_results = model(inp)
    finally:
        model.set_use_attn_result(False)
    torch.testing.assert_close(with_results, model(inp), rtol=0, atol=1e-4)


def test_decomposition_holds_on_every_family(tiny_next_checkpoint, tmp_path):
    sample = generate(1, seed=0)[0]
    models = [
        mmlens.load("tiny-shapes"),
        mmlens.from_pretrained(tiny_next_checkpoint()),
        mmlens.from_pretrained(build_tiny_llava_onevision(tmp_path / "onevision")),
        mmlens.from_pretrained(build_tiny_instructblip(tmp_path / "instructblip")),
    ]
    for model in models:
        inp = model.prepare(sample.image, sample.question)
        _, cache = model.run_with_cache(inp)
        final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
        error = (cache.decompose_resid().sum(0) - final).abs().amax(-1)[0]
        assert error[inp.positions("image")].max() < TOLERANCE
        assert error.max() < TOLERANCE
