"""Command line: `mmlens demo`.

Until the shipped trained model lands (issue #6), the demo builds a small random LLaVA
checkpoint, loads it through the real loading path, and prints a hooked forward pass: the
segments of the input, some cached activations, a per-layer logit lens at the last position,
and the effect of an attention-pattern hook.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from PIL import Image, ImageDraw


def demo_image() -> Image.Image:
    image = Image.new("RGB", (84, 60), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 30, 30), fill="red")
    draw.ellipse((50, 20, 78, 48), fill="blue")
    return image


def demo() -> None:
    import mmlens
    from mmlens.testing import build_tiny_llava

    with tempfile.TemporaryDirectory() as folder:
        print(f"building a random LLaVA-1.5-style checkpoint in {folder} ...")
        build_tiny_llava(folder)
        model = mmlens.from_pretrained(folder)
    cfg = model.cfg
    print(
        f"loaded {type(model).__name__}: {cfg.n_layers} decoder layers, d_model={cfg.d_model}, "
        f"{cfg.n_heads} heads ({cfg.n_key_value_heads} kv), vision {cfg.vision.n_layers} layers, "
        f"{len(model.hook_dict)} hook points"
    )
    inp = model.prepare(demo_image(), "What colour is the square?")
    print(f"\nprompt: {inp.prompts[0]!r}")
    for segment in ("system", "image", "user", "question", "last"):
        positions = inp.positions(segment)
        print(
            f"  {segment:9s} {len(positions):4d} positions  {positions[:6].tolist()}{' ...' if len(positions) > 6 else ''}"
        )

    logits, cache = model.run_with_cache(inp)
    print("\ncached activations (of", len(cache), "hook points):")
    for name in (
        "hook_image_embeds",
        "blocks.0.attn.hook_pattern",
        "blocks.0.hook_resid_post",
        "vision.hook_features",
    ):
        print(f"  {name:32s} {tuple(cache[name].shape)}")

    print("\nlogit lens at the last position (top token after each layer):")
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1) @ model.W_U  # [layer, batch, vocab]
    for label, layer_logits in zip(
        ["embed", *[f"layer {i}" for i in range(cfg.n_layers)]], lens[:, 0], strict=True
    ):
        probabilities = layer_logits.softmax(-1)
        top = int(probabilities.argmax())
        print(f"  {label:8s} {model.to_string([top])!r:14s} p={probabilities[top]:.3f}")

    image_positions = inp.positions("image")

    def block_image_keys(scores: torch.Tensor, hook) -> torch.Tensor:
        scores[:, :, -1, image_positions] = float("-inf")  # last query row cannot see the image
        return scores

    decoder_scores = [f"blocks.{layer}.attn.hook_attn_scores" for layer in range(cfg.n_layers)]
    blocked = model.run_with_hooks(
        inp, fwd_hooks=[(name, block_image_keys) for name in decoder_scores]
    )
    p_clean = logits[0, -1].softmax(-1)
    answer = int(p_clean.argmax())
    p_blocked = blocked[0, -1].softmax(-1)[answer]
    print(
        f"\nknocking out image -> last in every layer changes p({model.to_string([answer])!r}) "
        f"from {p_clean[answer]:.3f} to {p_blocked:.3f}"
    )
    generated = model.generate(inp, max_new_tokens=6)
    print(f"greedy continuation: {model.to_string(generated[0, inp.input_ids.shape[1] :])!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mmlens")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="run a hooked forward pass on a small checkpoint and print it")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo()


if __name__ == "__main__":
    main()
