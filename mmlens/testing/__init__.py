"""Tiny random llava-hf checkpoints, built locally and offline (for tests, benchmarks, the demo).

`build_tiny_llava(folder)` (LLaVA-1.5) and `build_tiny_llava_next(folder, family=...)` (LLaVA-NeXT)
write folders that `transformers` loads like real llava-hf checkpoints:
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration.from_pretrained(folder)``
and ``AutoProcessor.from_pretrained(folder)``. The tokenizers are real (small) BPE tokenizers of
each checkpoint family, trained in-process on a built-in corpus (`make_tokenizer`), so segment
detection and offsets are exercised as with a real checkpoint; the weights are random but far
from uniform so parity tests have teeth.

The builders live in one module per model family, and this package re-exports their names:

- `mmlens.testing.tokenizer`: the in-process tokenizers (`make_tokenizer`, `make_bert_tokenizer`,
  `tokenizer_corpus`, `FAMILIES`).
- `mmlens.testing.common`: the standard test images (`make_test_image`, `TEST_IMAGE_SIZES`) and
  what the builders share (vision and decoder configs, random weights).
- `mmlens.testing.llava`: LLaVA-1.5 (`build_tiny_llava`, `make_image_processor`) and
  LLaVA-Interleave (`build_tiny_llava_interleave`).
- `mmlens.testing.llava_next`: LLaVA-NeXT (`build_tiny_llava_next`,
  `make_anyres_image_processor`, `TINY_GRID_PINPOINTS`).
- `mmlens.testing.llava_onevision`: LLaVA-OneVision (`build_tiny_llava_onevision`).
- `mmlens.testing.instructblip`: InstructBLIP (`build_tiny_instructblip`).
- `mmlens.testing.qwen2_vl`: Qwen2-VL (`build_tiny_qwen2_vl`).
- `mmlens.testing.qwen2_5_vl`: Qwen2.5-VL (`build_tiny_qwen2_5_vl`).
- `mmlens.testing.qwen3_vl`: Qwen3-VL (`build_tiny_qwen3_vl`).
- `mmlens.testing.gemma3`: Gemma 3 (`build_tiny_gemma3`).
- `mmlens.testing.qwen_vl`: the original Qwen-VL release layout (`build_tiny_qwen_vl`).
- `mmlens.testing.internvl`: InternVL's -hf layout (`build_tiny_internvl`) and an original
  InternVL2 release with an InternLM2 decoder (`build_tiny_internvl_release`).
- `mmlens.testing.hf_reference`: the Hugging Face reference (`assert_matches_hf`,
  `hf_position_ids`, `hf_image_features`, `hf_answer_gradients`).

Examples:
    >>> from mmlens.testing import build_tiny_llava, build_tiny_llava_next
    >>> folder = build_tiny_llava("checkpoints/tiny-llava")
    >>> next_folder = build_tiny_llava_next("checkpoints/tiny-next", family="llama3")
    >>> type(mmlens.from_pretrained(next_folder)).__name__
    'HookedLlavaNext'
"""

from __future__ import annotations

from mmlens.testing.common import TEST_IMAGE_SIZES, make_test_image
from mmlens.testing.common import _randomize_weights as _randomize_weights
from mmlens.testing.gemma3 import build_tiny_gemma3, hf_gemma3_inputs
from mmlens.testing.hf_reference import (
    assert_matches_hf,
    hf_answer_gradients,
    hf_image_features,
    hf_position_ids,
)
from mmlens.testing.instructblip import build_tiny_instructblip
from mmlens.testing.internvl import build_tiny_internvl, build_tiny_internvl_release
from mmlens.testing.llava import build_tiny_llava, build_tiny_llava_interleave, make_image_processor
from mmlens.testing.llava_next import (
    TINY_GRID_PINPOINTS,
    build_tiny_llava_next,
    make_anyres_image_processor,
)
from mmlens.testing.llava_onevision import build_tiny_llava_onevision
from mmlens.testing.qwen2_5_vl import build_tiny_qwen2_5_vl
from mmlens.testing.qwen2_vl import build_tiny_qwen2_vl, hf_qwen_vl_inputs
from mmlens.testing.qwen3_vl import build_tiny_qwen3_vl
from mmlens.testing.qwen_vl import build_tiny_qwen_vl
from mmlens.testing.tokenizer import (
    BPE_VOCAB_SIZE,
    FAMILIES,
    LLAMA3_SPECIAL_TOKENS,
    LLAMA3_SPLIT_PATTERN,
    make_bert_tokenizer,
    make_tokenizer,
    tokenizer_corpus,
)

__all__ = [
    "BPE_VOCAB_SIZE",
    "FAMILIES",
    "LLAMA3_SPECIAL_TOKENS",
    "LLAMA3_SPLIT_PATTERN",
    "TEST_IMAGE_SIZES",
    "TINY_GRID_PINPOINTS",
    "assert_matches_hf",
    "build_tiny_instructblip",
    "build_tiny_internvl",
    "build_tiny_internvl_release",
    "build_tiny_llava",
    "build_tiny_llava_interleave",
    "build_tiny_llava_next",
    "build_tiny_llava_onevision",
    "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl",
    "hf_qwen_vl_inputs",
    "build_tiny_qwen3_vl",
    "build_tiny_gemma3",
    "hf_gemma3_inputs",
    "build_tiny_qwen_vl",
    "hf_answer_gradients",
    "hf_image_features",
    "hf_position_ids",
    "make_anyres_image_processor",
    "make_bert_tokenizer",
    "make_image_processor",
    "make_test_image",
    "make_tokenizer",
    "tokenizer_corpus",
]
