"""Tiny random checkpoints in the original Qwen-VL release layout (`build_tiny_qwen_vl`): the
files the hub's ``Qwen/Qwen-VL-Chat`` holds (``config.json`` with its ``visual`` section and an
``auto_map`` naming remote code, ``generation_config.json``, ``tokenizer_config.json``,
``qwen.tiktoken``, the weights under ``transformer.*`` / ``lm_head.*``), at a small size.

Every release hard-codes 256 resampler queries and a 16 x 16 table of tower positions (its
``visual.py``); these checkpoints write smaller counts into ``visual`` (``n_queries``,
``n_positions``), which mmlens reads with 256 as the default. The vocabulary is a byte-level BPE
trained in-process on `mmlens.testing.tokenizer.tokenizer_corpus`, written as tiktoken ranks.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mmlens.models.qwen_vl.release import QWEN_SPLIT_PATTERN, SPECIAL_TOKENS
from mmlens.testing.tokenizer import tokenizer_corpus

NEVER_RUN = "raise RuntimeError('the checkpoint folder's Python code ran')\n"
"""What the builder writes into the release's remote-code files: importing them fails."""


def write_tiktoken_vocabulary(path: Path, vocab_size: int = 600) -> int:
    """Train a byte-level BPE with Qwen's split pattern on the test corpus and write it as a
    tiktoken file (``base64(token bytes) rank`` per line, ranks 0..n-1, the 256 bytes first);
    returns the number of ranks.

    Examples:
        >>> write_tiktoken_vocabulary(Path("vocab.tiktoken"))
        600
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = tokenizer_corpus("llama3") + ["Picture 1: user assistant system helpful assistant"]
    backend.train_from_iterator(corpus, trainer)
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    pieces = sorted(backend.get_vocab().items(), key=lambda item: item[1])
    lines = [
        f"{base64.b64encode(bytes(byte_of[char] for char in piece)).decode()} {rank}"
        for piece, rank in pieces
    ]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def build_tiny_qwen_vl(
    path: str | Path,
    *,
    n_layers: int = 2,
    d_model: int = 256,
    n_heads: int = 4,
    d_mlp: int = 128,
    vision_layers: int = 2,
    vision_width: int = 32,
    vision_heads: int = 4,
    image_size: int = 84,
    patch_size: int = 14,
    n_queries: int = 16,
    n_positions: int = 64,
    chat_format: str = "chatml",
    weights: str = "safetensors",
    seed: int = 0,
) -> Path:
    """Write a random Qwen-VL release: a Qwen decoder of `n_layers` (`d_model` wide, an MLP of
    two `d_mlp` halves), a `vision_layers`-block tower on `image_size` px in `patch_size` px
    patches with a position table of `n_positions` (a square, resized to the patch grid), a
    resampler of `n_queries` queries (``d_model // 128`` heads, as the release derives them),
    the chat format `chat_format` (``chatml``: Qwen-VL-Chat, ``raw``: Qwen-VL), and the
    weights as ``model.safetensors`` or, with ``weights="bin"``, ``pytorch_model.bin``.

    Examples:
        >>> folder = build_tiny_qwen_vl("checkpoints/qwen-vl")
        >>> type(mmlens.from_pretrained(folder)).__name__
        'HookedQwenVL'
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n_ranks = write_tiktoken_vocabulary(path / "qwen.tiktoken")
    vocab_size = -(-(n_ranks + len(SPECIAL_TOKENS)) // 64) * 64  # padded, as the release's
    image_start_id = n_ranks + SPECIAL_TOKENS.index("<img>")
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "hidden_size": d_model,
        "intermediate_size": 2 * d_mlp,
        "kv_channels": d_model // n_heads,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "no_bias": True,
        "num_attention_heads": n_heads,
        "num_hidden_layers": n_layers,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": 2048,
        "tie_word_embeddings": False,
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "visual": {
            "heads": vision_heads,
            "image_size": image_size,
            "image_start_id": image_start_id,
            "layers": vision_layers,
            "mlp_ratio": 2.0,
            "output_dim": d_model,
            "patch_size": patch_size,
            "width": vision_width,
            "n_queries": n_queries,
            "n_positions": n_positions,
        },
        "vocab_size": vocab_size,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"chat_format": chat_format, "eos_token_id": n_ranks, "max_window_size": 6144})
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
                "model_max_length": 8192,
                "tokenizer_class": "QWenTokenizer",
            }
        )
    )
    for name in ("modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py", "visual.py"):
        (path / name).write_text(NEVER_RUN)
    tensors = _random_release_tensors(config, seed)
    if weights == "bin":
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _random_release_tensors(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor of a release with `config`, random but far from uniform: matrices of
    std 1/sqrt(fan-in), norms around 1, biases around 0, the resampler's fixed 2-D sin-cos
    positions as the release computes them."""
    generator = torch.Generator().manual_seed(seed)
    visual = config["visual"]
    d_model, width, vocab = config["hidden_size"], visual["width"], config["vocab_size"]
    d_mlp, d_vision_mlp = config["intermediate_size"] // 2, int(width * visual["mlp_ratio"])
    patch, n_queries = visual["patch_size"], visual["n_queries"]

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator) / cols**0.5

    def around(value: float, size: int) -> torch.Tensor:
        return value + 0.1 * torch.randn(size, generator=generator)

    tensors = {
        "transformer.wte.weight": torch.randn(vocab, d_model, generator=generator),
        "transformer.ln_f.weight": around(1.0, d_model),
        "lm_head.weight": matrix(vocab, d_model),
    }
    for layer in range(config["num_hidden_layers"]):
        block = f"transformer.h.{layer}."
        tensors |= {
            block + "ln_1.weight": around(1.0, d_model),
            block + "attn.c_attn.weight": matrix(3 * d_model, d_model),
            block + "attn.c_attn.bias": around(0.0, 3 * d_model),
            block + "attn.c_proj.weight": matrix(d_model, d_model),
            block + "ln_2.weight": around(1.0, d_model),
            block + "mlp.w1.weight": matrix(d_mlp, d_model),
            block + "mlp.w2.weight": matrix(d_mlp, d_model),
            block + "mlp.c_proj.weight": matrix(d_model, d_mlp),
        }
    tower = "transformer.visual."
    tensors |= {
        tower + "conv1.weight": matrix(width, 3 * patch * patch).reshape(width, 3, patch, patch),
        tower + "positional_embedding": torch.randn(
            visual["n_positions"], width, generator=generator
        ),
        tower + "ln_pre.weight": around(1.0, width),
        tower + "ln_pre.bias": around(0.0, width),
    }
    for layer in range(visual["layers"]):
        block = f"{tower}transformer.resblocks.{layer}."
        tensors |= {
            block + "ln_1.weight": around(1.0, width),
            block + "ln_1.bias": around(0.0, width),
            block + "attn.in_proj.weight": matrix(3 * width, width),
            block + "attn.in_proj.bias": around(0.0, 3 * width),
            block + "attn.out_proj.weight": matrix(width, width),
            block + "attn.out_proj.bias": around(0.0, width),
            block + "ln_2.weight": around(1.0, width),
            block + "ln_2.bias": around(0.0, width),
            block + "mlp.c_fc.weight": matrix(d_vision_mlp, width),
            block + "mlp.c_fc.bias": around(0.0, d_vision_mlp),
            block + "mlp.c_proj.weight": matrix(width, d_vision_mlp),
            block + "mlp.c_proj.bias": around(0.0, width),
        }
    pool = tower + "attn_pool."
    tensors |= {
        pool + "query": torch.randn(n_queries, d_model, generator=generator),
        pool + "pos_embed": _sincos_2d(d_model, int(n_queries**0.5)),
        pool + "kv_proj.weight": matrix(d_model, width),
        pool + "attn.in_proj_weight": matrix(3 * d_model, d_model),
        pool + "attn.in_proj_bias": around(0.0, 3 * d_model),
        pool + "attn.out_proj.weight": matrix(d_model, d_model),
        pool + "attn.out_proj.bias": around(0.0, d_model),
        pool + "ln_q.weight": around(1.0, d_model),
        pool + "ln_q.bias": around(0.0, d_model),
        pool + "ln_kv.weight": around(1.0, d_model),
        pool + "ln_kv.bias": around(0.0, d_model),
        tower + "ln_post.weight": around(1.0, d_model),
        tower + "ln_post.bias": around(0.0, d_model),
        tower + "proj": matrix(d_model, d_model),
    }
    return {name: tensor.contiguous() for name, tensor in tensors.items()}


def _sincos_2d(d_model: int, side: int) -> torch.Tensor:
    """``[side * side, d_model]``: sin and cos of each cell's column (first half, the
    release's meshgrid puts the width first) and row (second half) at geometric frequencies
    (the release's ``get_2d_sincos_pos_embed``)."""
    omega = 1.0 / 10000 ** (np.arange(d_model // 4, dtype=np.float64) / (d_model / 4))
    columns, rows = np.meshgrid(
        np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64)
    )

    def encode(position: np.ndarray) -> np.ndarray:
        angles = np.outer(position.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return torch.from_numpy(np.concatenate([encode(columns), encode(rows)], axis=1)).float()
