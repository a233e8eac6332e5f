"""Forward-pass speed: HF `LlavaForConditionalGeneration` / `LlavaNextForConditionalGeneration` /
`LlavaOnevisionForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` /
`Gemma3ForConditionalGeneration` / `InternVLForConditionalGeneration` (sdpa) vs mmlens, side
by side.

Builds a random checkpoint in a temporary folder, loads it with both libraries and times,
interleaved in one run: HF forward, mmlens forward, and mmlens `run_with_cache` with every hook
cached. Prints medians and the ratios against HF; also checks that the logits agree.

- ``--family llava`` (default): LLaVA-1.5-shaped (336 px image, patch 14 -> 576 image tokens).
- ``--family next``: LLaVA-NeXT-shaped (llava-v1.6's 336 px crops and tile grids; a 640 x 480
  image -> 2 x 2 tiles -> 576 base + 36 x 48 unpadded tile tokens + 36 newlines = 2,340 image
  tokens). Its cache skips attention scores and patterns (16 x 2,400² floats per layer, twice:
  ~6 GB in fp32) unless ``--cache-patterns``.
- ``--family onevision``: LLaVA-OneVision-shaped (SigLIP, 384 px crops of 27 x 27 patches, tile
  grids up to 6 x 6, ``anyres_max_9``, a Qwen2 decoder); a 1920 x 1080 image -> 3 x 5 tiles,
  unpadded to 75 x 135 patches and downsampled to 60 x 108 -> 729 base + 60 x 109 = 7,269 image
  tokens (OneVision only downsamples above ~7,000). Patterns are skipped as for ``next``.
- ``--family qwen2_5_vl``: Qwen2.5-VL-shaped (dynamic resolution: the released patch 14, 2 x 2
  merge, windows of 112 px, full attention in blocks 1 and 3 of the 4-block tower, a Qwen2 decoder
  with M-RoPE sections 8 / 12 / 12 and 4 key-value heads); a 1280 x 720 image is resized to
  1288 x 728 -> 92 x 52 patches -> 46 x 26 = 1,196 image tokens. Patterns are skipped as for
  ``next`` (the tower's window attention runs as masks over all 4,784 patches).
- ``--family gemma3``: Gemma-3-shaped (SigLIP at 896 px, 14 px patches -> 64 x 64, pooled 4 x 4
  to 256 image tokens; the decoder with sandwich norms, 16 heads over 8 key-value heads of 64,
  local layers with a window of 128 positions (so it bites on this prompt) and every sixth
  layer global, bidirectional image block).
- ``--family internvl``: InternVL-shaped (InternViT on 448 px crops of 14 px patches with
  QK-norm and layer scale, pixel shuffle to 16 x 16 tokens per crop, the MLP connector, a Qwen2
  decoder with 4 key-value heads); a 1344 x 896 image -> 3 x 2 tiles + the thumbnail = 7 crops
  -> 1,792 image tokens. Patterns are skipped as for ``next``.

All use a decoder of width 1024 (8 layers) and a 4-layer vision tower of width 256
(`timing.LLAVA_15_SHAPE`).

    python bench/forward.py [--family next] [--device cuda] [--dtype bfloat16] [--repeats 7]
    MMLENS_KEEP_FREED_MEMORY=0 python bench/forward.py   # CPU: glibc's default allocator behaviour
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from PIL import Image
from timing import LLAVA_15_SHAPE, measure, report
from transformers import (
    Gemma3ForConditionalGeneration,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

import mmlens
from mmlens.testing import (
    build_tiny_gemma3,
    build_tiny_internvl,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen2_5_vl,
    hf_gemma3_inputs,
    hf_qwen_vl_inputs,
)


def _build_qwen2_5_vl(folder: str, image_size: int, **shape) -> None:
    """`build_tiny_qwen2_5_vl` on the shared shape: no fixed image size (the processor resizes
    each image itself); M-RoPE sections in the released proportions (16 / 24 / 24 of 64)."""
    half = shape["d_model"] // shape["n_heads"] // 2
    build_tiny_qwen2_5_vl(folder, mrope_section=(half // 4, 3 * half // 8, 3 * half // 8), **shape)


def _build_gemma3(folder: str, **shape) -> None:
    """`build_tiny_gemma3` on the shared shape at Gemma 3's 896 px and 256 image tokens."""
    build_tiny_gemma3(
        folder, d_head=64, n_kv_heads=8, query_pre_attn_scalar=64, sliding_window=128,
        sliding_window_pattern=6, mm_tokens_per_image=256, **shape,
    )  # fmt: skip


FAMILIES = {  # name: (checkpoint builder, HF class, image (height, width), shape overrides)
    "llava": (build_tiny_llava, LlavaForConditionalGeneration, (400, 300), {}),
    "next": (build_tiny_llava_next, LlavaNextForConditionalGeneration, (480, 640), {}),
    "onevision": (
        build_tiny_llava_onevision,
        LlavaOnevisionForConditionalGeneration,
        (1080, 1920),
        dict(image_size=384, max_tiles=6, vision_aspect_ratio="anyres_max_9", n_kv_heads=4),
    ),
    "qwen2_5_vl": (
        _build_qwen2_5_vl,
        Qwen2_5_VLForConditionalGeneration,
        (720, 1280),
        dict(
            n_kv_heads=4,
            vision_d_mlp=512,
            window_size=112,
            fullatt_block_indexes=(1, 3),
            min_pixels=56 * 56,
            max_pixels=28 * 28 * 16384,
        ),
    ),
    "internvl": (
        build_tiny_internvl,
        InternVLForConditionalGeneration,
        (896, 1344),
        dict(image_size=448, n_kv_heads=4),
    ),
}
FAMILIES["gemma3"] = (
    _build_gemma3,
    Gemma3ForConditionalGeneration,
    (480, 640),
    dict(image_size=896, patch_size=14),
)
SKIP_PATTERNS = (
    "next",
    "onevision",
    "qwen2_5_vl",
    "internvl",
)  # families whose caches skip patterns
DECODER_FIELDS = ("d_model", "n_layers", "n_heads", "d_mlp")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="llava", choices=list(FAMILIES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--cache-patterns",
        action="store_true",
        help="--family next / onevision / qwen2_5_vl / internvl: also cache attention scores "
        "and patterns",
    )
    for field in DECODER_FIELDS:
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=LLAVA_15_SHAPE[field])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = {**LLAVA_15_SHAPE, **{field: getattr(args, field) for field in DECODER_FIELDS}}
    build, hf_class, image_size, overrides = FAMILIES[args.family]
    shape = {**shape, **overrides}

    with tempfile.TemporaryDirectory() as folder:
        build(folder, **shape)
        hf = hf_class.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(args.device).eval()
        model = mmlens.from_pretrained(folder, dtype=dtype, device=args.device)
        # In half precision the two libraries round differently; both are held against HF in
        # float32 (random weights amplify rounding, so the float32 reference is what counts).
        reference = None
        if dtype != torch.float32:
            reference = hf_class.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()

    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (*image_size, 3), dtype=np.uint8)
    )
    inp = model.prepare(image, "What colour is the shape in the top left corner of the picture?")
    # Qwen-VL: HF's rope index finds the image tokens by their type ids.
    # Gemma 3: HF's bidirectional image blocks come from the token type ids.
    kwargs = (
        hf_qwen_vl_inputs(model, inp)
        if args.family == "qwen2_5_vl"
        else hf_gemma3_inputs(model, inp)
        if args.family == "gemma3"
        else inp.model_kwargs()
    )
    n_tokens = kwargs["input_ids"].shape[1]
    n_image = int((kwargs["input_ids"] == model.cfg.image_token_id).sum())
    print(
        f"family={args.family} device={args.device} dtype={args.dtype} tokens={n_tokens} "
        f"image_tokens={n_image} {shape}"
    )

    if args.family in SKIP_PATTERNS and not args.cache_patterns:
        cache_name, names_filter = "mmlens_run_with_cache_no_patterns", _not_attention_pattern
    else:
        cache_name, names_filter = "mmlens_run_with_cache_all_hooks", None
    runs = {
        "hf_sdpa_forward": lambda: hf(**kwargs).logits,
        "mmlens_forward": lambda: model(inp),
        cache_name: lambda: model.run_with_cache(inp, names_filter=names_filter),
    }
    with torch.inference_mode():
        hf_logits, mm_logits = hf(**kwargs).logits.float(), model(inp).float()
        relative = (hf_logits - mm_logits).abs().max() / hf_logits.abs().max()
        same_top1 = (hf_logits.argmax(-1) == mm_logits.argmax(-1)).float().mean()
        print(
            f"max |logits_hf - logits_mmlens| / max |logits_hf| = {relative:.1e}; same argmax {same_top1:.1%}"
        )
        if reference is not None:
            exact = reference(**{**kwargs, "pixel_values": inp.pixel_values.float()}).logits
            for name, logits in (("hf", hf_logits), ("mmlens", mm_logits)):
                error = (logits - exact).abs().max() / exact.abs().max()
                agree = (logits.argmax(-1) == exact.argmax(-1)).float().mean()
                print(
                    f"{args.dtype} {name} vs HF float32: max |difference| / max |logits| = "
                    f"{error:.1e}; same argmax {agree:.1%}"
                )
            del reference
        keeps_memory = args.device == "cpu" and os.environ.get("MMLENS_KEEP_FREED_MEMORY") != "0"
        setting = "CPU allocator keeps freed memory (mmlens.perf)" if keeps_memory else ""
        report(measure(runs, args.repeats, args.device), "hf_sdpa_forward", setting)


def _not_attention_pattern(name: str) -> bool:
    return not name.endswith(("hook_attn_scores", "hook_pattern"))


if __name__ == "__main__":
    main()
