"""Reading the residual stream and the attention pattern: logit lens, attention share, high-norm
image patches (semantics in docs/analyses.md).

Each analysis takes a model (and runs it, caching only what it needs) or an `ActivationCache`
of a run on the same input (`cache.model` is the model), and returns tidy results that carry the
model name and the settings, so a figure (`mmlens.plot`) can be redrawn later.

Examples:
    >>> ids = answer_token_variants(model, inp, "red")        # "▁red", "▁Red" where both exist
    >>> probabilities = logit_lens(model, inp, ids)           # layer, token, token_str, probability
    >>> shares = attention_share(model, inp)                  # layer, segment, share
    >>> high_norm_patches(model, inp).positions               # outlier image positions: none
    tensor([], dtype=torch.int64)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from einops import reduce
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from mmlens.analysis.probability import answer_token_ids
from mmlens.inputs import input_settings
from mmlens.sequence import KVCache

MAD_TO_STD = 1.4826
"""Median absolute deviation -> standard deviation of a normal distribution."""


def answer_variants(answer: str) -> dict[str, str]:
    """The answer with a lower-case and with a capitalised initial, by name.

    >>> answer_variants("red")
    {'lower-case': 'red', 'capitalised': 'Red'}
    """
    return {
        "lower-case": answer[:1].lower() + answer[1:],
        "capitalised": answer[:1].upper() + answer[1:],
    }


def answer_token_variants(model: Any, inp: Any, answer: str, item: int = 0) -> list[int]:
    """Ids of the first sub-word of `answer` with a lower-case and a capitalised initial.

    As the Cross-modal Information Flow paper tracks them (Figure 6: "Noncapitalized" and
    "Capitalized Answer"): the first token each variant is generated as right after the prompt
    of `item` (`answer_token_ids`: "▁red" for SentencePiece, "Ġred" for byte-level BPE).
    Duplicates (e.g. a digit) appear once; a variant the tokenizer can only write as its unknown
    token is left out.

    Examples:
        >>> model.to_str_tokens(torch.tensor(answer_token_variants(model, inp, "red")))
        ['red']

        tiny-shapes' word-level vocabulary has no "Red"; a Llama tokenizer gives
        ``['▁red', '▁Red']``.
    """
    ids = [answer_token_ids(model, inp, text, item)[0] for text in answer_variants(answer).values()]
    # A variant the tokenizer cannot write (its unknown token, e.g. tiny-shapes' word-level
    # vocabulary has no capitalised answers) is not tracked.
    unknown = getattr(model.tokenizer, "unk_token_id", None)
    known = [token for token in ids if token != unknown] or ids
    return list(dict.fromkeys(known))


def logit_lens(
    model_or_cache: Any,
    inp: Any,
    tokens: int | str | Sequence[int | str] | Int[Tensor, "n_tokens"],
    position: int | Literal["last"] = "last",
    apply_final_norm: bool | Literal["last_layer"] | None = None,
    item: int = 0,
    preset: Any = None,
) -> pd.DataFrame:
    """Probability of `tokens` read off the residual stream at `position` after every layer.

    Layer 0 is the embeddings (`blocks.0.hook_resid_pre`), layer ``l >= 1`` the stream after
    block ``l - 1`` (`blocks.{l-1}.hook_resid_post`). Each is passed through the model's own
    final norm (`ln_final`, weight included; skipped with ``apply_final_norm=False``),
    unembedded with `W_U` and softmaxed over the vocabulary. With the norm, the last layer's row
    is exactly the model's output distribution. ``apply_final_norm="last_layer"`` reproduces the
    Cross-modal paper's curve: its code unembedded HF's `hidden_states`, which are raw for
    layers 0..L-1 and already final-normed at L, so only the last row has the norm.

    Args:
        model_or_cache: a model (run here, caching only the residual hooks) or an
            `ActivationCache` of a run on `inp` holding those hooks.
        tokens: token ids, or strings that are single tokens (`model.to_single_token`); for an
            answer as generated use `answer_token_variants`.
        position: a sequence position, or "last" (the last prompt position).
        apply_final_norm: True, False or "last_layer" (default: the preset's, else True).
        item: batch item.
        preset: a paper preset (`mmlens.presets`): `inp` must have been prepared with it; it
            supplies `apply_final_norm`.

    Returns:
        columns ``layer, token, token_str, probability``, one row per layer and token; `attrs`
        holds the analysis name, model name, position and settings.

    Examples:
        >>> result = logit_lens(model, inp, answer_token_variants(model, inp, "red"))
        >>> result.round(2).pivot(index="layer", columns="token_str", values="probability")
        token_str   red
        layer
        0          0.03
        1          0.07
        2          0.88
        3          0.99
        4          1.00
        5          1.00
        6          1.00
    """
    names = _residual_hooks(model_or_cache)
    model, cache = _model_and_cache(model_or_cache, inp, names)
    if preset is not None:
        preset.check_input(model, inp)
        apply_final_norm = preset.apply_final_norm if apply_final_norm is None else apply_final_norm
    apply_final_norm = True if apply_final_norm is None else apply_final_norm
    for name in names:
        _check_unpruned(name, _n_positions(inp), cache[name].shape[1])
    token_ids = [
        model.to_single_token(token) if isinstance(token, str) else int(token)
        for token in ([tokens] if isinstance(tokens, (int, str)) else tokens)
    ]
    pos = int(inp.positions("last", item)) if position == "last" else int(position)
    resid = torch.stack([cache[name][item, pos] for name in names])  # [layer, d_model]
    with torch.no_grad():
        if apply_final_norm == "last_layer":
            logits = torch.cat(
                (model.to_logits(resid[:-1], final_norm=False), model.to_logits(resid[-1:]))
            )
        elif isinstance(apply_final_norm, bool):
            logits = model.to_logits(resid, final_norm=apply_final_norm)
        else:
            raise ValueError(
                f"apply_final_norm={apply_final_norm!r}: use True, False or 'last_layer'"
            )
        probabilities = logits.float().softmax(-1)[:, token_ids]  # [layer, token]
    token_strs = model.tokenizer.convert_ids_to_tokens(token_ids)
    result = pd.DataFrame(
        [
            (layer, token, token_str, float(probabilities[layer, column]))
            for layer in range(len(names))
            for column, (token, token_str) in enumerate(zip(token_ids, token_strs, strict=True))
        ],
        columns=["layer", "token", "token_str", "probability"],
    )
    result.attrs = {
        "analysis": "logit_lens",
        "model": model.cfg.model_name,
        "position": pos,
        "item": item,
        "apply_final_norm": apply_final_norm,
        "preset": None if preset is None else preset.name,
        "inputs": input_settings(inp),
    }
    return result


SEGMENTS = ("system", "image", "user")
"""Key segments of `attention_share` (plus "generated" with ``query="generated"``)."""


def attention_share(
    model_or_cache: Any,
    inp: Any,
    query: Literal["last", "generated"] = "last",
    heads: Literal["mean", "max"] = "mean",
    item: int = 0,
    max_new_tokens: int = 16,
) -> pd.DataFrame:
    """Share of the query row's attention that goes to each segment, per layer.

    From Redundancy to Relevance, eq. 6–8: at every layer, the attention pattern's query row is
    summed over the keys of each segment (system, image, user), per head; the heads are
    aggregated (mean, or max per segment), and the shares normalised to sum to 1 per layer.

    ``query="last"`` reads the last prompt position, where the first answer token is predicted.
    ``query="generated"`` generates greedily (up to `max_new_tokens`, stopping at EOS), runs
    prompt + answer, and averages over the rows that predicted each generated token: the last
    prompt position and every generated token but the final one. Keys then include the
    "generated" segment (the generated tokens fed back).

    Args:
        model_or_cache: a model, or an `ActivationCache` of a run on `inp` holding every
            layer's `attn.hook_pattern` (only ``query="last"``).
        item: batch item.

    Returns:
        columns ``layer, segment, share``; `attrs` holds the model name, the query rows and the
        settings (and the generated ids for ``query="generated"``).

    Examples:
        >>> shares = attention_share(model, inp)
        >>> shares.round(2).pivot(index="layer", columns="segment", values="share")
        segment  image  system  user
        layer
        0         0.11    0.50  0.39
        1         0.86    0.10  0.04
        2         0.62    0.30  0.08
        3         0.63    0.28  0.09
        4         0.47    0.36  0.17
        5         0.34    0.57  0.09
    """
    if heads not in ("mean", "max"):
        raise ValueError(f"heads={heads!r}: use 'mean' or 'max'")
    model = _model_of(model_or_cache)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    sample = inp.item(item)  # positions below are the sample's own, without padding
    segments = {name: sample.positions(name) for name in SEGMENTS}
    last = int(sample.positions("last"))
    attrs: dict[str, Any] = {}
    if query == "last":
        rows = torch.tensor([last])
        if isinstance(model_or_cache, ActivationCache):
            pad = int((inp.attention_mask[item] == 0).sum())
            patterns = _cached_pattern_rows(model_or_cache, inp, names, rows + pad, item)
            segments = {name: positions + pad for name, positions in segments.items()}
        else:
            patterns = _pattern_rows(model, sample, names, rows)
    elif query == "generated":
        if isinstance(model_or_cache, ActivationCache):
            raise ValueError("query='generated' needs the model (it generates), not a cache")
        generated = model.generate(sample, max_new_tokens=max_new_tokens)[:, last + 1 :]
        rows = torch.arange(last, last + generated.shape[1])
        segments["generated"] = rows[1:]
        # The final generated token predicts nothing measured: it is not run.
        patterns = _pattern_rows(model, sample.with_tokens(generated[:, :-1]), names, rows)
        attrs["generated_ids"] = generated[0].tolist()
    else:
        raise ValueError(f"query={query!r}: use 'last' or 'generated'")

    per_head = torch.stack(
        [patterns[..., positions.to(patterns.device)].sum(-1) for positions in segments.values()],
        dim=-1,
    )  # [layer, head, row, segment]
    per_row = reduce(per_head, "layer head row segment -> layer row segment", heads)
    shares = per_row.mean(1)
    shares = shares / shares.sum(-1, keepdim=True)
    result = pd.DataFrame(
        [
            (layer, segment, float(shares[layer, column]))
            for layer in range(len(names))
            for column, segment in enumerate(segments)
        ],
        columns=["layer", "segment", "share"],
    )
    result.attrs = {
        "analysis": "attention_share",
        "model": model.cfg.model_name,
        "query": query,
        "query_positions": rows.tolist(),
        "heads": heads,
        "item": item,
        "inputs": input_settings(inp),
        **attrs,
    }
    return result


@dataclass(frozen=True)
class HighNormPatches:
    """Image positions whose residual norm is an outlier (`high_norm_patches`).

    Attributes:
        positions: sequence positions of the outliers, ``[n_high]``.
        norms: their norms, ``[n_high]``.
        image_positions: every image position examined, ``[n_image]``.
        image_norms: the norm at each of them, ``[n_image]`` (for a histogram).
        threshold: the norm above which a position is an outlier.
        settings: model name, layer, item, and how the threshold was chosen.
    """

    positions: Int[Tensor, "n_high"]
    norms: Float[Tensor, "n_high"]
    image_positions: Int[Tensor, "n_image"]
    image_norms: Float[Tensor, "n_image"]
    threshold: float
    settings: dict[str, Any]


def high_norm_patches(
    model_or_cache: Any,
    inp: Any,
    threshold: float | None = None,
    layer: int = 0,
    mad_multiple: float = 5.0,
    item: int = 0,
) -> HighNormPatches:
    """Image positions whose residual-stream norm is an outlier (Cross-modal paper, appendix E).

    The L2 norm of `blocks.{layer}.hook_resid_pre` at every image position of batch item
    `item` (layer 0: the projected image embeddings). A position is an outlier when its norm is
    above `threshold` (the paper used 57 for LLaVA-1.5-13b) or, without one, above the robust
    rule ``median + mad_multiple * 1.4826 * MAD`` (`mad_multiple` standard deviations of a normal
    distribution fitted robustly; a few huge norms do not move it).

    Examples:
        >>> high = high_norm_patches(model, inp)
        >>> other = inp.positions("image")[~torch.isin(inp.positions("image"), high.positions)]
        >>> len(other), round(high.threshold, 1)      # no outliers in tiny-shapes' 64 patches
        (64, 46.0)
    """
    name = f"blocks.{layer}.hook_resid_pre"
    model, cache = _model_and_cache(model_or_cache, inp, [name])
    _check_unpruned(name, _n_positions(inp), cache[name].shape[1])
    image_positions = inp.positions("image", item)
    norms = cache[name][item, image_positions.to(cache[name].device)].float().norm(dim=-1).cpu()
    if threshold is None:
        median = norms.median()
        mad = (norms - median).abs().median()
        threshold = float(median + mad_multiple * MAD_TO_STD * mad)
        rule = f"median + {mad_multiple} * 1.4826 * MAD"
    else:
        rule = "given"
    high = norms > threshold
    return HighNormPatches(
        positions=image_positions.cpu()[high],
        norms=norms[high],
        image_positions=image_positions.cpu(),
        image_norms=norms,
        threshold=float(threshold),
        settings={"model": model.cfg.model_name, "layer": layer, "item": item, "rule": rule},
    )


def _model_of(model_or_cache: Any) -> Any:
    return model_or_cache.model if isinstance(model_or_cache, ActivationCache) else model_or_cache


def _residual_hooks(model_or_cache: Any) -> list[str]:
    """`blocks.0.hook_resid_pre`, then every block's `hook_resid_post`."""
    n_layers = _model_of(model_or_cache).cfg.n_layers
    return ["blocks.0.hook_resid_pre"] + [
        f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)
    ]


def _model_and_cache(
    model_or_cache: Any, inp: Any, names: list[str]
) -> tuple[Any, ActivationCache]:
    """The model and a cache holding `names`: the given cache, or a run caching just those."""
    if isinstance(model_or_cache, ActivationCache):
        _check_cached(model_or_cache, names)
        return model_or_cache.model, model_or_cache
    with torch.no_grad():
        _, cache = model_or_cache.run_with_cache(inp, names_filter=names, return_type=None)
    return model_or_cache, cache


def _check_cached(cache: ActivationCache, names: list[str]) -> None:
    missing = [name for name in names if name not in cache.cache_dict]
    if missing:
        raise ValueError(
            f"the cache lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}; run "
            "run_with_cache with these hooks, or pass the model"
        )


def _cached_pattern_rows(
    cache: ActivationCache, inp: Any, names: list[str], rows: Int[Tensor, "row"], item: int
) -> Float[Tensor, "layer head row k_pos"]:
    """Rows `rows` of every named attention pattern of a cache of a run on `inp`."""
    _check_cached(cache, names)
    patterns = [cache[name][item] for name in names]
    for name, pattern in zip(names, patterns, strict=True):
        _check_unpruned(name, _n_positions(inp), *pattern.shape[-2:])
    return torch.stack([pattern[:, rows.to(pattern.device)] for pattern in patterns]).float()


def _pattern_rows(
    model: Any, sample: Any, names: list[str], rows: Int[Tensor, "row"]
) -> Float[Tensor, "layer head row k_pos"]:
    """Rows `rows` of every named attention pattern of a run of `sample` (batch 1).

    Only those rows run with explicit attention: every earlier position runs once through SDPA
    into a KV cache (no `[head, pos, pos]` pattern anywhere), then the rows run on it with the
    pattern hooks. Peak memory stays near a plain forward's (docs/performance.md).
    """
    first = int(rows.min())
    if bool((sample.input_ids[:, first:] == sample.image_token_id).any()):
        raise ValueError("the query rows must come after the image tokens")
    n_positions = _n_positions(sample)
    rows_from_first = (rows - first).to(sample.device)
    kept: dict[str, Tensor] = {}

    def keep_rows(pattern: Tensor, hook: Any) -> None:
        _check_unpruned(hook.name, n_positions, pattern.shape[-1])
        kept[hook.name] = pattern[0, :, rows_from_first].float()

    kwargs = sample.model_kwargs()
    earlier = {name: kwargs[name][:, :first] for name in ("input_ids", "attention_mask")}
    images = {name: value for name, value in kwargs.items() if name not in earlier}
    cache = KVCache.empty(model.cfg.n_layers, 1, sample.device)
    with torch.no_grad():
        model(**earlier, **images, past_kv_cache=cache, return_type=None)
        model.run_with_hooks(
            input_ids=kwargs["input_ids"][:, first:],
            attention_mask=kwargs["attention_mask"][:, first:],
            past_kv_cache=cache,
            return_type=None,
            fwd_hooks=[(name, keep_rows) for name in names],
        )
    return torch.stack([kept[name] for name in names])


def _n_positions(inp: Any) -> int:
    """Sequence length of a `MultimodalInput`."""
    return inp.input_ids.shape[1]


def _check_unpruned(name: str, n_positions: int, *sizes: int) -> None:
    """Analyses index positions of the input: every position must still be there (no pruning
    hook ran before this layer: `sizes` are its activation's position axes)."""
    if set(sizes) != {n_positions}:
        raise ValueError(
            f"{name} holds {min(sizes)} positions but the input has {n_positions}: tokens were "
            "pruned (drop_tokens, fastv, truncate_image_tokens) before this layer. Use a cache "
            "of an unpruned run on this input, or run this analysis outside the pruning hooks"
        )
