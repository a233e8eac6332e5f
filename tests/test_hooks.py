"""Hook names and shapes, editable scores/patterns, caches, ActivationCache helpers, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmlens

PROMPT = "What colour is the square?"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return mmlens.from_pretrained(tiny_checkpoint(n_kv_heads=2, vision_feature_layer=-1))


@pytest.fixture(scope="module")
def inp(model):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 50, 3), dtype=np.uint8))
    return model.prepare(image, PROMPT)


def decoder_hook_shapes(cfg: mmlens.MMConfig, batch: int, pos: int) -> dict[str, tuple[int, ...]]:
    heads, kv_heads, d_head = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    resid, scale, pattern = (batch, pos, cfg.d_model), (batch, pos, 1), (batch, heads, pos, pos)
    return {
        "hook_resid_pre": resid,
        "ln1.hook_scale": scale,
        "ln1.hook_normalized": resid,
        "attn.hook_q": (batch, pos, heads, d_head),
        "attn.hook_k": (batch, pos, kv_heads, d_head),
        "attn.hook_v": (batch, pos, kv_heads, d_head),
        "attn.hook_rot_q": (batch, pos, heads, d_head),
        "attn.hook_rot_k": (batch, pos, kv_heads, d_head),
        "attn.hook_attn_scores": pattern,
        "attn.hook_pattern": pattern,
        "attn.hook_z": (batch, pos, heads, d_head),
        "hook_attn_out": resid,
        "hook_resid_mid": resid,
        "ln2.hook_scale": scale,
        "ln2.hook_normalized": resid,
        "mlp.hook_pre": (batch, pos, cfg.d_mlp),
        "mlp.hook_pre_linear": (batch, pos, cfg.d_mlp),
        "mlp.hook_post": (batch, pos, cfg.d_mlp),
        "hook_mlp_out": resid,
        "hook_resid_post": resid,
    }


def test_every_documented_hook_exists_with_its_shape(model, inp):
    cfg, vision = model.cfg, model.cfg.vision
    batch, pos = inp.input_ids.shape
    _, cache = model.run_with_cache(inp)
    expected = {}
    for layer in range(cfg.n_layers):
        for name, shape in decoder_hook_shapes(cfg, batch, pos).items():
            expected[f"blocks.{layer}.{name}"] = shape
    n_image_tokens = vision.grid_size**2
    expected |= {
        "hook_token_embed": (batch, pos, cfg.d_model),
        "hook_embed": (batch, pos, cfg.d_model),
        "hook_image_embeds": (1, n_image_tokens, cfg.d_model),
        "ln_final.hook_scale": (batch, pos, 1),
        "ln_final.hook_normalized": (batch, pos, cfg.d_model),
        "vision.hook_embed": (1, n_image_tokens + 1, vision.d_model),
        "vision.hook_features": (1, n_image_tokens, vision.d_model),
        "projector.hook_in": (1, n_image_tokens, vision.d_model),
        "projector.hook_out": (1, n_image_tokens, cfg.d_model),
    }
    vision_tokens = n_image_tokens + 1
    for layer in range(vision.n_layers):  # vision_feature_layer=-1: every vision block runs
        prefix = f"vision.blocks.{layer}."
        expected[prefix + "hook_resid_post"] = (1, vision_tokens, vision.d_model)
        expected[prefix + "attn.hook_pattern"] = (1, vision.n_heads, vision_tokens, vision_tokens)
        expected[prefix + "mlp.hook_post"] = (1, vision_tokens, vision.d_mlp)
    for name, shape in expected.items():
        assert name in cache, name
        assert tuple(cache[name].shape) == shape, name
    per_head_results = {name for name in model.hook_dict if name.endswith("attn.hook_result")}
    assert set(cache.keys()) == set(model.hook_dict) - per_head_results, "every hook fires once"
    model.set_use_attn_result(True)
    try:
        _, cache = model.run_with_cache(inp)
    finally:
        model.set_use_attn_result(False)
    assert set(cache.keys()) == set(model.hook_dict)
    heads = (cfg.n_heads, cfg.d_model)
    assert tuple(cache["blocks.0.attn.hook_result"].shape) == (batch, pos, *heads)


def test_unused_vision_layers_do_not_run(tiny_checkpoint):
    model = mmlens.from_pretrained(tiny_checkpoint())  # vision_feature_layer=-2
    inp = model.prepare(Image.new("RGB", (56, 56), "red"), PROMPT)
    _, cache = model.run_with_cache(inp, names_filter=lambda name: name.startswith("vision.blocks"))
    last = model.cfg.vision.n_layers - 1
    assert f"vision.blocks.{last - 1}.hook_resid_post" in cache
    assert not any(name.startswith(f"vision.blocks.{last}.") for name in cache)


def test_explicit_attention_path_equals_sdpa_path(model, inp):
    with torch.no_grad():
        fast = model(inp)
        explicit = model.run_with_hooks(
            inp, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda t, hook: t)]
        )
    assert (fast - explicit).abs().max() < 1e-5


@pytest.mark.parametrize("hook_name", ["attn.hook_attn_scores", "attn.hook_pattern"])
def test_editing_scores_or_pattern_changes_the_output(model, inp, hook_name):
    prefix = f"blocks.{model.cfg.n_layers - 1}.attn."

    def attend_to_first_key_only(tensor, hook):
        edited = torch.full_like(tensor, float("-inf") if "scores" in hook_name else 0.0)
        edited[..., 0] = 0.0 if "scores" in hook_name else 1.0
        return edited

    with torch.no_grad():
        clean = model(inp)
        with model.hooks(fwd_hooks=[(prefix + hook_name.split(".")[-1], attend_to_first_key_only)]):
            edited, cache = model.run_with_cache(
                inp, names_filter=[prefix + "hook_v", prefix + "hook_z"]
            )
    assert (clean - edited).abs().max() > 1e-2
    # All attention on key 0: every position's z is value 0 of its head's kv head.
    group = model.cfg.n_heads // model.cfg.n_key_value_heads
    first_value = cache[prefix + "hook_v"][:, :1].repeat_interleave(group, dim=2)
    assert torch.allclose(
        cache[prefix + "hook_z"], first_value.expand_as(cache[prefix + "hook_z"]), atol=1e-6
    )


def test_names_filter_limits_the_cache(model, inp):
    names = ["blocks.0.hook_resid_post", "hook_image_embeds"]
    _, cache = model.run_with_cache(inp, names_filter=names)
    assert set(cache.keys()) == set(names)
    _, cache = model.run_with_cache(inp, names_filter=lambda name: name.endswith("hook_pattern"))
    assert set(cache.keys()) == {n for n in model.hook_dict if n.endswith("hook_pattern")}
    assert all(not hp.has_hooks() for hp in model.hook_dict.values()), (
        "caching hooks must be removed"
    )


def test_cache_sees_values_edited_by_earlier_hooks(model, inp):
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", lambda t, hook: torch.zeros_like(t))]):
        _, cache = model.run_with_cache(
            inp, names_filter=["blocks.0.hook_attn_out", "blocks.0.hook_resid_mid"]
        )
    assert cache["blocks.0.hook_attn_out"].abs().max() == 0
    _, clean = model.run_with_cache(inp, names_filter="blocks.0.hook_resid_pre")
    assert torch.equal(cache["blocks.0.hook_resid_mid"], clean["blocks.0.hook_resid_pre"])


def test_a_full_cache_holds_what_hooks_on_every_point_see(model, inp):
    """Points without hooks hand their activations to the cache directly (cache sinks): every
    cached tensor equals what a hook on that point receives, and no sink stays behind."""
    seen = {}

    def capture(tensor, hook):
        seen[hook.name] = tensor.detach().clone()

    with torch.no_grad():
        logits, cache = model.run_with_cache(inp)
        hooked = model.run_with_hooks(inp, fwd_hooks=[(lambda name: True, capture)])
    assert torch.equal(logits, hooked) and set(cache.keys()) == set(seen)
    for name, tensor in seen.items():
        assert torch.equal(cache[name], tensor), name
    assert all(point.sink is None for point in model.hook_dict.values())


def test_cache_options(model, inp):
    _, cache = model.run_with_cache(
        inp, names_filter="blocks.0.hook_resid_post", remove_batch_dim=True
    )
    assert cache["blocks.0.hook_resid_post"].shape == (inp.input_ids.shape[1], model.cfg.d_model)
    with pytest.raises(ValueError, match="does not exist"):
        model.run_with_cache(
            inp, names_filter=["blocks.0.hook_resid_post", "blocks.0.hook_nothing"]
        )


def test_cache_with_gradients(model, inp):
    loss, cache = model.run_with_cache(
        inp, names_filter=["blocks.0.hook_resid_post"], incl_bwd=True, return_type="loss"
    )
    gradient = cache["blocks.0.hook_resid_post_grad"]
    assert gradient.shape == cache["blocks.0.hook_resid_post"].shape and gradient.abs().sum() > 0
    assert all(not hp.has_hooks() for hp in model.hook_dict.values())


def test_failed_forward_leaves_no_caching_hook(model, inp):
    with pytest.raises(ValueError, match="no pixel_values"):
        model.run_with_cache(input_ids=inp.input_ids)
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())


def test_activation_cache_helpers_reproduce_the_logits(model, inp):
    logits, cache = model.run_with_cache(inp)
    accumulated, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels[-1] == "final_post" and accumulated.shape[0] == model.cfg.n_layers + 1
    assert (accumulated[-1] @ model.W_U - logits).abs().max() < 1e-4

    answer = int(logits[0, -1].argmax())
    components = cache.decompose_resid(pos_slice=-1)  # logit_attrs applies the final norm
    attributions = cache.logit_attrs(components, tokens=torch.tensor([answer]), pos_slice=-1)
    assert attributions.shape[0] == 2 * model.cfg.n_layers + 1  # embed + attn/mlp per layer
    assert torch.allclose(attributions.sum(0)[0], logits[0, -1, answer], atol=1e-4)


def test_hooks_context_manager_removes_hooks(model, inp):
    calls = []
    with model.hooks(
        fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: calls.append(hook.name))]
    ):
        model(inp)
    model(inp)
    assert calls == ["blocks.0.hook_resid_post"]


def test_hooks_apply_at_every_generation_step(model, inp):
    steps = []
    clean = model.generate(inp, max_new_tokens=4, stop_at_eos=False)
    with model.hooks(
        fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: steps.append(t.shape[1]))]
    ):
        model.generate(inp, max_new_tokens=4, stop_at_eos=False)
    assert steps == [inp.input_ids.shape[1], 1, 1, 1], "prefill once, then one position per step"

    def flip_residual(tensor, hook):
        return -tensor

    hooked = model.run_with_hooks(inp, fwd_hooks=[("ln_final.hook_normalized", flip_residual)])
    assert not torch.equal(hooked.argmax(-1), model(inp).argmax(-1))
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", flip_residual)]):
        flipped = model.generate(inp, max_new_tokens=4, stop_at_eos=False)
    assert not torch.equal(flipped, clean)


def test_tokenizer_helpers(model):
    tokens = model.to_tokens(PROMPT)
    assert tokens[0, 0] == model.tokenizer.bos_token_id
    assert model.to_string(tokens[0, 1:]) == PROMPT
    assert model.to_str_tokens(PROMPT)[1:] == model.tokenizer.tokenize(PROMPT)
    single = [
        w
        for w in ("square", "colour", "the", "What")
        if len(model.tokenizer(w, add_special_tokens=False).input_ids) == 1
    ]
    assert single, "the test tokenizer should have whole-word tokens"
    assert (
        model.to_single_token(single[0])
        == model.tokenizer(single[0], add_special_tokens=False).input_ids[0]
    )
    with pytest.raises(ValueError, match="not a single token"):
        model.to_single_token(PROMPT)


# ---------------------------------------------------------------------- errors
def test_out_of_range_layer_in_hook_name(model, inp):
    bad = f"blocks.{model.cfg.n_layers}.hook_resid_post"
    good = "blocks.0.hook_resid_post"
    with pytest.raises(
        ValueError,
        match=rf"layer {model.cfg.n_layers} does not exist.*0\.\.{model.cfg.n_layers - 1}",
    ):
        model.run_with_hooks(inp, fwd_hooks=[(good, lambda t, hook: t), (bad, lambda t, hook: t)])
    with pytest.raises(ValueError, match="vision.blocks"):
        model.run_with_hooks(
            inp, fwd_hooks=[("vision.blocks.40.hook_resid_post", lambda t, hook: t)]
        )
    with pytest.raises(ValueError, match="did you mean"):
        model.run_with_hooks(inp, fwd_hooks=[("blocks.0.hook_resid_pots", lambda t, hook: t)])
    assert all(not hp.has_hooks() for hp in model.hook_dict.values()), (
        "a failed call must leave no hook"
    )


def test_image_tokens_without_pixels(model, inp):
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=inp.input_ids, attention_mask=inp.attention_mask)


def test_more_images_than_image_slots(model, inp):
    two_images = torch.cat([inp.pixel_values, inp.pixel_values])
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=inp.input_ids, attention_mask=inp.attention_mask, pixel_values=two_images)


def test_hub_id_not_available_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        FileNotFoundError,
        match=r"'mmlens-tests/not-a-model' is not a checkpoint folder.*hf download",
    ):
        mmlens.from_pretrained("mmlens-tests/not-a-model")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        mmlens.from_pretrained(tmp_path)
