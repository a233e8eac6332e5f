"""HookedTransformer alone: Llama (Llama-3 rope scaling, GQA) and Mistral (sliding window)
text-only checkpoints, loaded through the same path, against HF within 1e-4 in fp32."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

import mmlens
from mmlens.testing import make_tokenizer

TOLERANCE = 1e-4
TEXTS = ["The red square is left of the blue circle.", "What colour is the small triangle on top?"]

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def decoder_config(kind: str, vocab_size: int, pad_token_id: int):
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if kind == "llama3":
        return LlamaConfig(**shape, rope_parameters=LLAMA3_ROPE, max_position_embeddings=128)
    return MistralConfig(**shape, sliding_window=8, rope_theta=1e6)


@pytest.fixture(scope="module", params=["llama3", "mistral"])
def checkpoint(request, tmp_path_factory):
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = decoder_config(request.param, len(tokenizer), tokenizer.pad_token_id)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in hf.named_parameters():
            parameter.copy_(
                1 + 0.2 * torch.randn_like(parameter)
                if "norm" in name
                else 0.15 * torch.randn_like(parameter)
            )
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return request.param, folder, hf


def test_dispatches_to_hooked_transformer(checkpoint):
    kind, folder, _ = checkpoint
    model = mmlens.from_pretrained(folder)
    assert type(model) is mmlens.HookedTransformer
    assert model.cfg.model_type == ("llama" if kind == "llama3" else "mistral")
    assert (model.cfg.sliding_window == 8) == (kind == "mistral")


def test_logits_and_residuals_match_hf(checkpoint):
    _, folder, hf = checkpoint
    model = mmlens.HookedTransformer.from_pretrained(folder)
    batch = model.tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert batch.input_ids.shape[1] > 8, "longer than the sliding window, so it is exercised"
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = hf(**batch, position_ids=position_ids, output_hidden_states=True)
        logits, cache = model.run_with_cache(TEXTS)
    real = batch.attention_mask.bool()
    assert torch.equal(model.to_tokens(TEXTS), batch.input_ids)
    assert (out.logits - logits)[real].abs().max() < TOLERANCE
    for layer in range(model.cfg.n_layers):
        assert (out.hidden_states[layer] - cache[f"blocks.{layer}.hook_resid_pre"])[
            real
        ].abs().max() < TOLERANCE


def test_greedy_generation_matches_hf(checkpoint):
    _, folder, hf = checkpoint
    model = mmlens.from_pretrained(folder)
    batch = model.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = hf.generate(**batch, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(TEXTS, max_new_tokens=12), expected)


def test_loss_is_next_token_cross_entropy(checkpoint):
    _, folder, hf = checkpoint
    model = mmlens.from_pretrained(folder)
    tokens = model.to_tokens(TEXTS[0])
    with torch.no_grad():
        expected = hf(input_ids=tokens, labels=tokens).loss
    assert torch.allclose(model(tokens, return_type="loss"), expected, atol=1e-5)


def test_text_model_rejects_images(checkpoint):
    _, folder, _ = checkpoint
    model = mmlens.from_pretrained(folder)
    with pytest.raises(ValueError, match="pixel_values"):
        model(model.to_tokens("hi"), pixel_values=torch.zeros(1, 3, 14, 14))
    with pytest.raises(TypeError, match="loads as HookedTransformer, not HookedLlava"):
        mmlens.HookedLlava.from_pretrained(folder)
