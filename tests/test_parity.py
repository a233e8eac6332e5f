"""Numerical parity with Hugging Face's LlavaForConditionalGeneration, with images.

Every check loads the same saved checkpoint twice: through HF and through mmlens' own loading
path (safetensors, tensor by tensor). fp32 tolerance is 1e-4 on logits and on every layer's
residual stream at real (non-pad) positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

import mmlens
from mmlens.testing import assert_matches_hf

TOLERANCE = 1e-4

CONFIGS = {
    "mha-layer-2-default-gelu": dict(),
    "gqa-layer-1-full-linear": dict(
        n_kv_heads=2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="linear",
    ),
    "mha-layer-list-default-gelu": dict(vision_feature_layer=[-3, -1], rope_theta=500.0),
}
PROMPTS = [
    "What colour is the square?",
    "Is there a red circle to the left of the small blue triangle?",
]


def random_images(sizes: list[tuple[int, int]], seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module", params=list(CONFIGS))
def loaded(request, tiny_checkpoint):
    folder = tiny_checkpoint(**CONFIGS[request.param])
    hf = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    model = mmlens.from_pretrained(folder)
    return hf, model


def test_loads_as_hooked_llava(loaded):
    _, model = loaded
    assert isinstance(model, mmlens.HookedLlava)


def test_logits_and_residuals_match_hf_on_padded_batch(loaded):
    hf, model = loaded
    inp = model.prepare(random_images([(56, 56), (90, 50)]), PROMPTS)
    assert inp.attention_mask[0].sum() < inp.attention_mask.shape[1], "prompts should need padding"
    assert_matches_hf(hf, model, inp, TOLERANCE)


def test_padded_item_equals_item_alone(loaded):
    _, model = loaded
    images = random_images([(56, 56), (90, 50)])
    batch = model.prepare(images, PROMPTS)
    alone = model.prepare(images[0], PROMPTS[0])
    with torch.no_grad():
        batch_logits, alone_logits = model(batch), model(alone)
    n_real = int(alone.attention_mask.sum())
    assert (batch_logits[0, -n_real:] - alone_logits[0]).abs().max() < TOLERANCE


def test_greedy_generation_matches_hf(loaded):
    hf, model = loaded
    inp = model.prepare(random_images([(60, 60), (40, 80)], seed=1), PROMPTS)
    with torch.no_grad():
        expected = hf.generate(**inp.model_kwargs(), max_new_tokens=10, do_sample=False)
    tokens = model.generate(inp, max_new_tokens=10)
    assert tokens.shape == expected.shape
    assert torch.equal(tokens, expected)


def test_bfloat16_matches_hf_bfloat16_and_stays_close_to_fp32(tiny_checkpoint):
    folder = tiny_checkpoint()
    model32 = mmlens.from_pretrained(folder)
    model16 = mmlens.from_pretrained(folder, dtype=torch.bfloat16)
    hf16 = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert model16.W_E.dtype == torch.bfloat16
    inp = model32.prepare(random_images([(56, 56)]), PROMPTS[0])
    with torch.no_grad():
        logits32, logits16 = model32(inp), model16(inp).float()
        hf_logits16 = hf16(**inp.model_kwargs()).logits.float()
    assert torch.isfinite(logits16).all()
    # Same bf16 rounding as HF, op for op: agreement far tighter than bf16's own error.
    assert (logits16 - hf_logits16).abs().max() < 1e-2 * logits32.abs().max()
    relative_error = (logits16 - logits32).abs().mean() / logits32.abs().mean()
    assert relative_error < 0.05
