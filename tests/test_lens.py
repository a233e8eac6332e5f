"""Logit lens, attention share and high-norm patches against computations done by hand from a
full activation cache of a small checkpoint."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from pandas.testing import assert_frame_equal
from transformers import AutoProcessor

import mmlens
from mmlens import plot
from mmlens.analysis.lens import (
    answer_token_variants,
    attention_share,
    high_norm_patches,
    logit_lens,
)


@pytest.fixture(scope="module")
def folder(tiny_checkpoint):
    return tiny_checkpoint(n_layers=4)


@pytest.fixture(scope="module")
def model(folder):
    return mmlens.from_pretrained(folder)


@pytest.fixture(scope="module")
def inp(model, images):
    return model.prepare(images[1], "What colour is the door?")


@pytest.fixture(scope="module")
def cache(model, inp):
    with torch.no_grad():
        return model.run_with_cache(inp)


def test_answer_token_variants_are_the_first_ids_after_the_prompt(model, inp, folder, images):
    processor = AutoProcessor.from_pretrained(folder)
    n_prompt = inp.input_ids.shape[1]
    expected = []
    for answer in ("red car", "Red car"):
        ids = processor(images=images[1], text=inp.prompts[0] + " " + answer).input_ids[0]
        assert ids[:n_prompt] == inp.input_ids[0].tolist()
        expected.append(ids[n_prompt])
    assert answer_token_variants(model, inp, "red car") == expected
    assert model.tokenizer.convert_ids_to_tokens(expected[:1]) == ["▁red"]


def as_tensor(table):
    return torch.tensor(table.to_numpy(copy=True), dtype=torch.float32)


def manual_lens(model, cache, position, apply_final_norm):
    """Residuals after each layer at `position` -> RMSNorm by hand -> W_U -> softmax."""
    names = ["blocks.0.hook_resid_pre"]
    names += [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    resid = torch.stack([cache[name][0, position] for name in names])
    if apply_final_norm:
        rms = (resid.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
        resid = resid / rms * model.ln_final.weight
    return (resid @ model.unembed.weight.T).softmax(-1)


@pytest.mark.parametrize("apply_final_norm", [True, False])
def test_logit_lens_matches_manual_unembedding(model, inp, cache, apply_final_norm):
    logits, full_cache = cache
    tokens = answer_token_variants(model, inp, "red") + [7]
    from_model = logit_lens(model, inp, tokens, apply_final_norm=apply_final_norm)
    from_cache = logit_lens(full_cache, inp, tokens, apply_final_norm=apply_final_norm)
    assert_frame_equal(from_model, from_cache, rtol=1e-4)  # runs with/without SDPA
    assert list(from_model.columns) == ["layer", "token", "token_str", "probability"]
    assert from_model.attrs["apply_final_norm"] is apply_final_norm
    last = int(inp.positions("last"))
    expected = manual_lens(model, full_cache, last, apply_final_norm)[:, tokens]
    table = from_model.pivot(index="layer", columns="token", values="probability")[tokens]
    torch.testing.assert_close(as_tensor(table), expected, rtol=1e-4, atol=1e-7)
    if apply_final_norm:  # the last layer is the model's own output distribution
        final = logits[0, last].softmax(-1)[tokens]
        torch.testing.assert_close(as_tensor(table)[-1], final, rtol=1e-5, atol=1e-8)


def test_logit_lens_as_the_paper_normalises_only_the_last_layer(model, inp, cache):
    _, full_cache = cache
    tokens = answer_token_variants(model, inp, "red")
    rows = {
        mode: logit_lens(full_cache, inp, tokens, apply_final_norm=mode).pivot(
            index="layer", columns="token", values="probability"
        )[tokens]
        for mode in (True, False, "last_layer")
    }
    paper = as_tensor(rows["last_layer"])
    torch.testing.assert_close(paper[:-1], as_tensor(rows[False])[:-1])
    torch.testing.assert_close(paper[-1], as_tensor(rows[True])[-1])
    assert not torch.allclose(paper[-1], as_tensor(rows[False])[-1])
    with pytest.raises(ValueError, match="use True, False or 'last_layer'"):
        logit_lens(full_cache, inp, tokens, apply_final_norm="paper")


def test_logit_lens_takes_strings_and_positions(model, inp, cache):
    _, full_cache = cache
    by_id = logit_lens(full_cache, inp, [model.to_single_token("red")], position=5)
    by_string = logit_lens(full_cache, inp, "red", position=5)
    by_tensor = logit_lens(full_cache, inp, torch.tensor([model.to_single_token("red")]), 5)
    assert by_id.equals(by_string) and by_id.equals(by_tensor)
    assert by_string.attrs["position"] == 5
    assert set(by_string.layer) == set(range(model.cfg.n_layers + 1))


def test_logit_lens_cache_must_hold_the_residuals(model, inp):
    _, partial = model.run_with_cache(inp, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(ValueError, match="cache lacks"):
        logit_lens(partial, inp, [5])


def manual_share(cache, inp, rows, segments, reduce_heads):
    """Per layer: segment sums of each head's rows, heads reduced, rows averaged, normalised."""
    shares = []
    for layer in range(cache.model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0][:, rows]  # [head, row, key]
        sums = torch.stack([pattern[..., positions].sum(-1) for positions in segments], -1)
        per_row = sums.mean(0) if reduce_heads == "mean" else sums.amax(0)
        share = per_row.mean(0)
        shares.append(share / share.sum())
    return torch.stack(shares)


@pytest.mark.parametrize("heads", ["mean", "max"])
def test_attention_share_matches_manual_sums(model, inp, cache, heads):
    _, full_cache = cache
    from_model = attention_share(model, inp, heads=heads)
    from_cache = attention_share(full_cache, inp, heads=heads)
    assert_frame_equal(from_model, from_cache, rtol=1e-4)  # runs with/without SDPA
    table = from_model.pivot(index="layer", columns="segment", values="share")
    table = table[["system", "image", "user"]]
    segments = [inp.positions(name) for name in ("system", "image", "user")]
    expected = manual_share(full_cache, inp, inp.positions("last"), segments, heads)
    torch.testing.assert_close(as_tensor(table), expected)
    assert (table.sum(axis=1) - 1).abs().max() < 1e-6
    if heads == "mean":  # the three segments hold every key of the last row: no renormalising
        pattern = full_cache["blocks.2.attn.hook_pattern"][0, :, -1]
        image_share = pattern[:, inp.positions("image")].sum(-1).mean()
        # From the same run as the pattern (the model's own run computes the prompt through
        # SDPA and differs by float rounding, checked above).
        cached = from_cache.pivot(index="layer", columns="segment", values="share")
        torch.testing.assert_close(float(cached.loc[2, "image"]), float(image_share))


def test_attention_share_over_generated_positions(model, inp):
    result = attention_share(model, inp, query="generated", max_new_tokens=4)
    generated = result.attrs["generated_ids"]
    assert generated == model.generate(inp, max_new_tokens=4)[0, inp.input_ids.shape[1] :].tolist()
    n_prompt = inp.input_ids.shape[1]
    sequence = torch.cat((inp.input_ids, torch.tensor([generated[:-1]])), dim=1)
    with torch.no_grad():
        _, full_cache = model.run_with_cache(input_ids=sequence, pixel_values=inp.pixel_values)
    rows = torch.arange(n_prompt - 1, n_prompt - 1 + len(generated))
    segments = [inp.positions(name) for name in ("system", "image", "user")] + [rows[1:]]
    expected = manual_share(full_cache, inp, rows, segments, "mean")
    table = result.pivot(index="layer", columns="segment", values="share")
    table = table[["system", "image", "user", "generated"]]
    torch.testing.assert_close(as_tensor(table), expected)
    assert result.attrs["query_positions"] == rows.tolist()


def test_attention_share_of_a_padded_batch_item_is_the_item_alone(model, images):
    batch = model.prepare([images[0], images[1]], ["Hi?", "What colour is the door?"])
    alone = model.prepare(images[0], "Hi?")
    assert batch.attention_mask[0, 0] == 0  # item 0 is left-padded
    for query in ("last", "generated"):
        in_batch = attention_share(model, batch, query=query, item=0, max_new_tokens=3)
        single = attention_share(model, alone, query=query, max_new_tokens=3)
        assert in_batch.attrs.get("generated_ids") == single.attrs.get("generated_ids")
        torch.testing.assert_close(
            as_tensor(in_batch.share), as_tensor(single.share), atol=1e-5, rtol=0
        )


def test_high_norm_patches_finds_a_planted_outlier(model, inp):
    planted = 5

    def scale_one_patch(image_embeds, hook):
        scale = torch.ones(image_embeds.shape[1])
        scale[planted] = 30
        return image_embeds * scale[:, None]

    with model.hooks(fwd_hooks=[("hook_image_embeds", scale_one_patch)]):
        found = high_norm_patches(model, inp)
        _, full_cache = model.run_with_cache(inp, names_filter="blocks.0.hook_resid_pre")
    image = inp.positions("image")
    norms = full_cache["blocks.0.hook_resid_pre"][0, image].norm(dim=-1)
    torch.testing.assert_close(found.image_norms, norms)
    assert found.positions.tolist() == [int(image[planted])]
    torch.testing.assert_close(found.norms, norms[[planted]])
    assert found.threshold < norms[planted] and found.settings["rule"].startswith("median")

    given = high_norm_patches(full_cache, inp, threshold=float(norms.median()))
    assert given.positions.tolist() == image[norms > norms.median()].tolist()

    deeper = high_norm_patches(model, inp, layer=2)
    _, full_cache = model.run_with_cache(inp, names_filter="blocks.2.hook_resid_pre")
    torch.testing.assert_close(
        deeper.image_norms, full_cache["blocks.2.hook_resid_pre"][0, image].norm(dim=-1)
    )


def test_figures(model, inp, cache):
    _, full_cache = cache
    tokens = answer_token_variants(model, inp, "red") + [7]
    lens_figure = plot.logit_lens(logit_lens(full_cache, inp, tokens))
    assert isinstance(lens_figure, go.Figure) and len(lens_figure.data) == len(tokens)
    assert len(lens_figure.data[0].x) == model.cfg.n_layers + 1

    share_figure = plot.attention_share(attention_share(full_cache, inp))
    assert [trace.name for trace in share_figure.data] == ["system", "image", "user"]
    assert share_figure.layout.barmode == "stack"

    norm_figure = plot.patch_norms(high_norm_patches(full_cache, inp))
    assert len(norm_figure.data) == 1 and len(norm_figure.layout.shapes) == 1
