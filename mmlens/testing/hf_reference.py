"""The Hugging Face model as the reference mmlens is checked against, independently of mmlens:
HF `generate`'s position ids (`hf_position_ids`), the projected image features of an HF forward
(`hf_image_features`), Grad-CAM's outputs and gradients through HF modules
(`hf_answer_gradients`), and the parity assertion of logits and residual streams
(`assert_matches_hf`).
"""

from __future__ import annotations

from typing import Any

import torch


def hf_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each item's first real token, as HF `generate` computes them
    (a plain HF forward would count from the padded start)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def hf_image_features(output: Any) -> torch.Tensor:
    """The projected image features of an HF LLaVA forward output, `[n_image_tokens, d_model]`
    (LLaVA-NeXT: packed, newline tokens included), whatever the transformers version.

    transformers < 5.2x returns them as the tensor `image_hidden_states`; 5.2x keeps them in
    `image_outputs.pooler_output`, one tensor per image (and deprecates `image_hidden_states`,
    which returns that list).

    Examples:
        >>> from transformers import LlavaForConditionalGeneration
        >>> hf = LlavaForConditionalGeneration.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
        >>> with torch.no_grad():
        ...     features = hf_image_features(hf(**inp.model_kwargs()))
        >>> features.shape                              # [n_image_tokens, d_model]
        torch.Size([64, 128])
    """
    image_outputs = getattr(output, "image_outputs", None)
    features = (
        image_outputs.pooler_output if image_outputs is not None else output.image_hidden_states
    )
    if isinstance(features, (list, tuple)):
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    return features.reshape(-1, features.shape[-1])


def hf_answer_gradients(
    hf_model: torch.nn.Module, kwargs: dict, modules: list[torch.nn.Module], n_prompt: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Grad-CAM's ingredients through a Hugging Face model, independently of mmlens: the
    outputs of `modules` (in the order they run) in one forward pass on `kwargs` (a batch-1
    prompt of `n_prompt` tokens followed by a teacher-forced answer) and the gradients of the
    summed logits of the answer's tokens with respect to them.

    Examples:
        >>> from transformers import LlavaForConditionalGeneration
        >>> hf = LlavaForConditionalGeneration.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
        >>> forced = inp.with_tokens(mmlens.analysis.answer_token_ids(model, inp, "red"))
        >>> norm = hf.model.language_model.layers[0].post_attention_layernorm
        >>> outputs, gradients = hf_answer_gradients(hf, forced.model_kwargs(), [norm], inp.input_ids.shape[1])
        >>> outputs[0].shape == gradients[0].shape == forced.input_ids.shape + (128,)
        True
    """
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda m, a, out: outputs.append(out)) for m in modules]
    try:
        logits = hf_model(**kwargs).logits
    finally:
        for handle in handles:
            handle.remove()
    answer = kwargs["input_ids"][0, n_prompt:]
    target = logits[0, n_prompt - 1 + torch.arange(len(answer)), answer].sum()
    return outputs, list(torch.autograd.grad(target, outputs))


def assert_matches_hf(
    hf_model: torch.nn.Module, model: torch.nn.Module, inp: Any, tolerance: float = 1e-4
) -> tuple:
    """Assert that mmlens and HF agree on `inp` at every real position: logits, every layer's
    residual stream, and the final normed state. Returns HF's output and mmlens' cache so that a
    test can check more.

    Examples:
        >>> from transformers import LlavaForConditionalGeneration
        >>> hf = LlavaForConditionalGeneration.from_pretrained(mmlens.zoo.checkpoint_path("tiny-shapes"))
        >>> out, cache = assert_matches_hf(hf, model, model.prepare([image, image], ["Why?", "Is it red?"]))
    """
    with torch.no_grad():
        out = hf_model(
            **inp.model_kwargs(),
            position_ids=hf_position_ids(inp.attention_mask),
            output_hidden_states=True,
        )
        logits, cache = model.run_with_cache(inp)
    real = inp.attention_mask.bool()
    assert (out.logits - logits)[real].abs().max() < tolerance, "logits"
    # InstructBLIP keeps its language model's states apart from the vision and Q-Former outputs.
    hidden_states = getattr(out, "hidden_states", None) or out.language_model_outputs.hidden_states
    for layer in range(model.cfg.n_layers):
        resid_pre = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (hidden_states[layer] - resid_pre)[real].abs().max() < tolerance, f"layer {layer}"
    final = cache["ln_final.hook_normalized"]  # HF's last hidden state is after the final norm
    assert (hidden_states[-1] - final)[real].abs().max() < tolerance, "final norm"
    assert logits.std() > 0.5, "random checkpoint too flat for parity to mean anything"
    return out, cache
