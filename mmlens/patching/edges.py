"""Edge attribution patching: which connections between components, and between segments of
the prompt, carry the difference between a clean and a corrupted input.

The graph (docs/analyses.md, "Edge attribution"): upstream nodes are the input (the first
block's residual stream: token embeddings and image features), each attention head's output
(`hook_z` times its `W_O`) and each MLP's output; downstream nodes are each head, each MLP and
the logits. Positions are grouped (by default into the prompt's segments: system, image,
question, between, last). An edge ``(upstream, source) -> (downstream, target)`` is what the
upstream node writes at the `source` positions as the downstream node reads it there, for a
head on behalf of its queries at the `target` positions: so ``image -> question`` through
``a1.h2`` is what head 2 of layer 1 moves from the image into the question. MLPs and the
logits read and write at the same positions (`target` = `source`).

Scores (first order, as `attribution_patching`'s): the change of the metric if the edge alone
carried its clean value into the corrupted run,

    score = sum over the source positions p of  (a_clean[p] - a_corrupted[p]) · g[p]

with `a` the upstream output and `g` the gradient of the metric with respect to the downstream
node's input at p (for a head: through its queries at the target positions only), at the
corrupted run (``method="eap"``: Syed et al. 2023) or averaged over `steps` inputs between the
corrupted and the clean one (``"eap-ig"``: Hanna et al. 2024).

`edge_patching` measures edges exactly (each edge alone patched into the corrupted run) and
`faithfulness` evaluates circuits: the clean run with every edge outside the circuit carrying
its corrupted value, as a fraction of the clean-corrupted gap.

Examples:
    >>> from mmlens.patching import logit_difference
    >>> from mmlens.zoo.shapes import counterfactual, generate
    >>> clean_sample = generate(1, seed=0)[0]                 # "Is the star blue or red?" red
    >>> corrupted_sample = counterfactual(clean_sample)       # the star painted blue
    >>> clean = model.prepare(clean_sample.image, clean_sample.question)
    >>> corrupted = model.prepare(corrupted_sample.image, corrupted_sample.question)
    >>> metric = logit_difference(model, clean, "red", "blue")
    >>> edges = edge_attribution_patching(model, clean, corrupted, metric, method="eap-ig", steps=4)
    >>> top = top_edges(edges, 3)
    >>> top[["upstream", "downstream", "source", "target"]].values.tolist()[0]
    ['input', 'a1.h3', 'image', 'last']
    >>> curve = faithfulness(model, clean, corrupted, metric, edges, sizes=[20, 100])
    >>> curve.faithfulness.round(2).tolist()
    [0.46, 1.0]

    Head 3 of layer 1 reads the star's colour from the image into the last position; a hundred
    of the graph's 8780 edges carry the whole clean-corrupted difference.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import einops
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mmlens.hooks import HookScope, ModuleHooks
from mmlens.patching.activation import UNITS, Metric, _cached_pair, _unit_positions

METHODS = ("eap", "eap-ig")
"""The scores `edge_attribution_patching` computes."""


@dataclass(frozen=True)
class EdgeGraph:
    """The nodes and position groups of one prompt layout.

    `upstream` lists ``"input"``, then per layer its heads ``"a{layer}.h{head}"`` and its MLP
    ``"m{layer}"``, in the order the model computes them; `group_of` gives each position's
    index into `groups`.
    """

    n_layers: int
    n_heads: int
    groups: tuple[str, ...]
    group_of: Int[Tensor, "pos"]

    @property
    def upstream(self) -> list[str]:
        names = ["input"]
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{head}" for head in range(self.n_heads)] + [f"m{layer}"]
        return names

    def readable(self, layer: int, mlp: bool = False) -> int:
        """How many upstream nodes (a prefix of `upstream`) the heads (or with `mlp`, the MLP)
        of `layer` read: every node computed before them."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if mlp else 0)

    def one_hot(self, dtype: torch.dtype, device: Any) -> Float[Tensor, "pos group"]:
        return torch.nn.functional.one_hot(self.group_of, len(self.groups)).to(dtype).to(device)


def edge_graph(model: Any, inp: Any, groups: dict[str, Tensor] | None = None) -> EdgeGraph:
    """The graph of `model` on `inp`'s layout, positions grouped by `groups` (name ->
    positions; default the segments of `mmlens.patching.UNITS`). Positions no group names form
    the group ``"other"``.

    Examples:
        >>> graph = edge_graph(model, inp)
        >>> graph.groups, len(graph.upstream)
        (('system', 'image', 'question', 'between', 'last'), 31)
    """
    _check_model(model)
    if groups is None:
        groups = {unit: _unit_positions(inp, unit) for unit in UNITS}
    n_positions = inp.input_ids.shape[1]
    group_of = torch.full((n_positions,), -1, dtype=torch.long)
    names = []
    for name, positions in groups.items():
        positions = torch.as_tensor(positions, dtype=torch.long).cpu()
        if not len(positions):
            continue
        if positions.min() < 0 or positions.max() >= n_positions:
            raise ValueError(f"group {name!r} has positions outside 0..{n_positions - 1}")
        if (group_of[positions] >= 0).any():
            raise ValueError(f"group {name!r} shares positions with an earlier group")
        group_of[positions] = len(names)
        names.append(name)
    if (group_of < 0).any():
        group_of[group_of < 0] = len(names)
        names.append("other")
    return EdgeGraph(model.cfg.n_layers, model.cfg.n_heads, tuple(names), group_of)


def edge_attribution_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    *,
    method: Literal["eap", "eap-ig"] = "eap-ig",
    steps: int = 8,
    groups: dict[str, Tensor] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Score every edge of the graph (the module doc gives the graph and the formula).

    Args:
        model: a model whose residual stream is the sum of its input, head and MLP outputs
            (families that norm outputs before they join it, or add image features inside the stack,
            are refused).
        clean, corrupted: single prompts of the same layout (`aligned_positions` finds every
            segment of the same length).
        metric: logits ``[rows, pos, d_vocab]`` -> one number per row, differentiable
            (`logit_difference`).
        method: ``"eap"`` (the gradient at the corrupted run) or ``"eap-ig"`` (integrated over
            `steps` inputs between the corrupted and the clean embeddings).
        groups: name -> positions (default: the segments).

    Returns:
        One row per edge: `upstream`, `downstream` (``"a{l}.h{h}"``, ``"m{l}"`` or
        ``"logits"``), `source`, `target` (group names), `score` (the estimated change of the
        metric) and `normalized` (score / (clean - corrupted)). `attrs`: the two baselines,
        `method`, `steps` and `groups` (name -> positions).

    Raises:
        ValueError: prompts of different layouts, a metric equal on both, an unknown method,
            a family whose residual stream is not that sum.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    graph = _checked_graph(model, clean, corrupted, groups)
    clean_score, corrupted_score, clean_acts, corrupted_acts = _baselines(
        model, clean, corrupted, metric
    )
    deltas = _Activations.difference(clean_acts, corrupted_acts)
    alphas = [1.0] if method == "eap" else [(step + 0.5) / steps for step in range(steps)]
    total: dict[str, Tensor] = {}
    for alpha in tqdm(alphas, desc="edge attribution", disable=not progress):
        embeds = None
        if method == "eap-ig":
            embeds = corrupted_acts.embed + alpha * (clean_acts.embed - corrupted_acts.embed)
        for key, scores in _edge_scores(model, corrupted, metric, embeds, deltas, graph).items():
            total[key] = total.get(key, 0) + scores / len(alphas)
    table = _edge_table(total, graph)
    table["normalized"] = table.score / (clean_score - corrupted_score)
    table.attrs = dict(
        model=str(model.cfg.model_name), clean=clean_score, corrupted=corrupted_score,
        method=method, steps=steps if method == "eap-ig" else None, n_layers=graph.n_layers,
        groups={name: (graph.group_of == index).nonzero().flatten().tolist()
                for index, name in enumerate(graph.groups)},
    )  # fmt: skip
    return table


def top_edges(edges: pd.DataFrame, n: int) -> pd.DataFrame:
    """The circuit of the `n` edges with the largest absolute scores (`score` or, where given,
    `metric` differences), largest first.

    Examples:
        >>> from mmlens.patching import logit_difference
        >>> from mmlens.zoo.shapes import counterfactual
        >>> other = counterfactual(sample)                     # the star painted blue
        >>> corrupted = model.prepare(other.image, other.question)
        >>> metric = logit_difference(model, inp, "red", "blue")
        >>> edges = edge_attribution_patching(model, inp, corrupted, metric, method="eap")
        >>> top_edges(edges, 2)[["upstream", "downstream", "target"]].values.tolist()
        [['input', 'a1.h3', 'last'], ['m4', 'logits', 'last']]
    """
    if n < 0:
        raise ValueError(f"n must be at least 0, got {n}")
    top = edges.loc[edges.score.abs().sort_values(ascending=False).index[:n]]
    top.attrs = dict(edges.attrs)  # the groups and baselines a plot or faithfulness reads
    return top


def edge_patching(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    edges: pd.DataFrame,
    *,
    groups: dict[str, Tensor] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Each edge of `edges` patched alone, exactly: the corrupted run in which that edge
    carries its clean value (its downstream node reads, at the source positions, the clean
    upstream output in place of the corrupted one) and nothing else changes.

    Returns:
        `edges` with `metric` (the patched run's) and `effect` (metric - corrupted), to compare
        with the estimated `score`.

    Examples:
        >>> from mmlens.patching import logit_difference
        >>> from mmlens.zoo.shapes import counterfactual
        >>> other = counterfactual(sample)                     # the star painted blue
        >>> corrupted = model.prepare(other.image, other.question)
        >>> metric = logit_difference(model, inp, "red", "blue")
        >>> edges = edge_attribution_patching(model, inp, corrupted, metric, method="eap")
        >>> exact = edge_patching(model, inp, corrupted, metric, top_edges(edges, 2))
        >>> bool((exact.effect * exact.score > 0).all())        # same sign as the estimate
        True
    """
    graph = _checked_graph(model, clean, corrupted, groups)
    _, corrupted_score, clean_acts, _ = _baselines(model, clean, corrupted, metric)
    metrics = []
    for _, edge in tqdm(list(edges.iterrows()), desc="edge patching", disable=not progress):
        masks = _EdgeMasks.empty(graph)
        masks.set(graph, edge, 1.0)
        metrics.append(_run_with_edges(model, corrupted, clean_acts, masks, graph, metric))
    result = edges.copy()
    result["metric"] = metrics
    result["effect"] = result.metric - corrupted_score
    return result


def faithfulness(
    model: Any,
    clean: Any,
    corrupted: Any,
    metric: Metric,
    edges: pd.DataFrame,
    *,
    sizes: Sequence[int],
    groups: dict[str, Tensor] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """The circuits of the top `sizes` edges of `edges` (`top_edges`), each evaluated exactly:
    the clean run with every edge outside the circuit carrying its corrupted value.

    Returns:
        One row per size: `n_edges`, `metric`, and `faithfulness` = (metric - corrupted) /
        (clean - corrupted): 1 when the circuit alone carries the clean behaviour.

    Examples:
        >>> from mmlens.patching import logit_difference
        >>> from mmlens.zoo.shapes import counterfactual
        >>> other = counterfactual(sample)                     # the star painted blue
        >>> corrupted = model.prepare(other.image, other.question)
        >>> metric = logit_difference(model, inp, "red", "blue")
        >>> edges = edge_attribution_patching(model, inp, corrupted, metric, method="eap")
        >>> curve = faithfulness(model, inp, corrupted, metric, edges, sizes=[0, 100, len(edges)])
        >>> curve.faithfulness.round(2).tolist()        # no edge clean: the corrupted run
        [0.0, 0.89, 1.0]
    """
    graph = _checked_graph(model, clean, corrupted, groups)
    clean_score, corrupted_score, _, corrupted_acts = _baselines(model, clean, corrupted, metric)
    rows = []
    for size in tqdm(list(sizes), desc="faithfulness", disable=not progress):
        masks = _EdgeMasks.full(graph)
        for _, edge in top_edges(edges, size).iterrows():
            masks.set(graph, edge, 0.0)
        value = _run_with_edges(model, clean, corrupted_acts, masks, graph, metric)
        rows.append({"n_edges": size, "metric": value})
    result = pd.DataFrame(rows)
    result["faithfulness"] = (result.metric - corrupted_score) / (clean_score - corrupted_score)
    result.attrs = dict(clean=clean_score, corrupted=corrupted_score, total=len(edges))
    return result


# ---------------------------------------------------------------------------------------------
# Shared checks and activations


def _check_model(model: Any) -> None:
    blocks = model.blocks
    if any(hasattr(block, "ln1_post") for block in blocks) or "blocks.0.hook_deepstack" in (
        model.hook_dict
    ):
        raise ValueError(
            f"edge attribution needs a residual stream that is the sum of the input, head and MLP "
            f"outputs; {model.cfg.model_name} norms its outputs before they join it (or adds "
            "image features inside the stack): use attribution_patching's per-site cells instead"
        )


def _checked_graph(model: Any, clean: Any, corrupted: Any, groups: Any) -> EdgeGraph:
    for name, inp in (("clean", clean), ("corrupted", corrupted)):
        if inp.batch_size != 1:
            raise ValueError(f"{name} holds {inp.batch_size} prompts; patch one pair at a time")
    graph, other = edge_graph(model, clean, groups), edge_graph(model, corrupted, groups)
    if graph.groups != other.groups or not torch.equal(graph.group_of, other.group_of):
        raise ValueError(
            "edge attribution compares the same positions in both prompts, and these have "
            "different layouts: make the corrupted prompt's segments as long as the clean one's"
        )
    return graph


@dataclass
class _Activations:
    """What edges read from one run: the input residual, each layer's `hook_z` and MLP output,
    and the input embeddings (`hook_embed`, interpolated by ``"eap-ig"``)."""

    embed: Tensor
    input: Tensor
    z: list[Tensor]
    mlp: list[Tensor]

    @staticmethod
    def names(n_layers: int) -> list[str]:
        return ["hook_embed", "blocks.0.hook_resid_pre"] + [
            f"blocks.{layer}.{point}"
            for layer in range(n_layers)
            for point in ("attn.hook_z", "hook_mlp_out")
        ]

    @classmethod
    def from_cache(cls, cache: Any, n_layers: int) -> _Activations:
        return cls(
            cache["hook_embed"][0],
            cache["blocks.0.hook_resid_pre"][0],
            [cache[f"blocks.{layer}.attn.hook_z"][0] for layer in range(n_layers)],
            [cache[f"blocks.{layer}.hook_mlp_out"][0] for layer in range(n_layers)],
        )

    @classmethod
    def difference(cls, a: _Activations, b: _Activations) -> _Activations:
        return cls(
            a.embed - b.embed,
            a.input - b.input,
            [x - y for x, y in zip(a.z, b.z, strict=True)],
            [x - y for x, y in zip(a.mlp, b.mlp, strict=True)],
        )


def _baselines(
    model: Any, clean: Any, corrupted: Any, metric: Metric
) -> tuple[float, float, _Activations, _Activations]:
    n_layers = model.cfg.n_layers
    clean_score, corrupted_score, clean_cache, corrupted_cache = _cached_pair(
        model, clean, corrupted, metric, _Activations.names(n_layers)
    )
    return (
        clean_score,
        corrupted_score,
        _Activations.from_cache(clean_cache, n_layers),
        _Activations.from_cache(corrupted_cache, n_layers),
    )


def _upstream_outputs(
    model: Any, deltas: _Activations, layer: int
) -> Float[Tensor, "node pos d_model"]:
    """Layer `layer`'s upstream nodes' contributions to the residual stream, from its
    `hook_z` and MLP-output differences: ``[head_0 .. head_{H-1}, mlp]``."""
    heads = einops.einsum(
        deltas.z[layer], model.blocks[layer].attn.W_O, "pos head d_head, head d_head d_model -> head pos d_model"
    )  # fmt: skip
    if layer < len(deltas.mlp):
        mlp = deltas.mlp[layer]
    else:  # the MLP has not run yet: only its own layer's MLP, which reads the heads, is here
        mlp = torch.zeros_like(heads[0])
    return torch.cat([heads, mlp[None]])


def _upstream_by_layer(model: Any, deltas: _Activations, n_layers: int):
    """(first upstream index, contributions) for the input and each of the first `n_layers`
    layers, in the order of `EdgeGraph.upstream`."""
    yield 0, deltas.input[None]
    for layer in range(n_layers):
        yield 1 + layer * (model.cfg.n_heads + 1), _upstream_outputs(model, deltas, layer)


# ---------------------------------------------------------------------------------------------
# Scores


def _edge_scores(
    model: Any,
    inp: Any,
    metric: Metric,
    embeds: Tensor | None,
    deltas: _Activations,
    graph: EdgeGraph,
) -> dict[str, Tensor]:
    """One gradient pass (at `inp`, its input embeddings replaced by `embeds` where given):
    per downstream kind, the scores ``[downstream..., upstream, source group]``."""
    n_layers = model.cfg.n_layers
    captured: dict[str, Tensor] = {}

    def leaf(activation: Tensor, hook: Any) -> Tensor:
        source = activation if embeds is None else embeds[None].to(activation)
        return source.detach().requires_grad_()

    def capture(activation: Tensor, hook: Any) -> None:
        captured[hook.name] = activation

    points = ["hook_resid_pre", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_v",
              "attn.hook_z", "hook_resid_mid", "hook_mlp_out"]  # fmt: skip
    names = [f"blocks.{layer}.{point}" for layer in range(n_layers) for point in points]
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    one_hot = graph.one_hot(deltas.input.dtype, deltas.input.device)
    with (
        torch.enable_grad(),
        HookScope(model, [("hook_embed", leaf), *[(name, capture) for name in [*names, final]]]),
    ):
        score = metric(model(inp)).sum()
        wanted = [captured[f"blocks.{layer}.{point}"] for layer in range(n_layers)
                  for point in ("attn.hook_attn_scores", "attn.hook_z", "hook_mlp_out")]  # fmt: skip
        gradients = torch.autograd.grad(score, [*wanted, captured[final]], retain_graph=True)
        head_scores, mlp_scores = [], []
        for layer in range(n_layers):
            grad_scores, grad_z, grad_mlp = gradients[3 * layer : 3 * layer + 3]
            at = {point: captured[f"blocks.{layer}.{point}"] for point in points}
            head_inputs = _head_input_gradients(model, layer, at, grad_scores, grad_z, graph)
            mlp_input = torch.autograd.grad(
                at["hook_mlp_out"], at["hook_resid_mid"], grad_mlp, retain_graph=True
            )[0][0]
            head_scores.append(
                _scores(model, deltas, head_inputs, one_hot, graph.readable(layer), layer)
            )
            mlp_scores.append(
                _scores(model, deltas, mlp_input[None], one_hot, graph.readable(layer, True), layer + 1)
            )  # fmt: skip
        logits = _scores(model, deltas, gradients[-1][0][None], one_hot, None, n_layers)

    def padded(scores: Tensor) -> Tensor:  # zero for the upstream nodes a node cannot read
        return torch.nn.functional.pad(scores, (0, 0, 0, len(graph.upstream) - scores.shape[-2]))

    return {
        "heads": torch.stack([padded(scores) for scores in head_scores]),
        "mlp": torch.stack([padded(scores[0]) for scores in mlp_scores]),
        "logits": logits[0],
    }


def _head_input_gradients(
    model: Any,
    layer: int,
    at: dict[str, Tensor],
    grad_scores: Float[Tensor, "1 head q_pos k_pos"],
    grad_z: Float[Tensor, "1 q_pos head d_head"],
    graph: EdgeGraph,
) -> Float[Tensor, "head_target pos d_model"]:
    """Per head h and target group B, the gradient of the metric with respect to the layer's
    input through h's queries at B only: through the scores of B's rows (queries and keys)
    and through the values as B's rows weigh them."""
    attn = model.blocks[layer].attn
    group = attn.n_heads // attn.n_key_value_heads
    pattern, x = at["attn.hook_pattern"], at["hook_resid_pre"]
    rows = [graph.group_of.to(x.device) == index for index in range(len(graph.groups))]
    gradients = []
    for head in range(attn.n_heads):
        for target in rows:
            score_part = torch.zeros_like(grad_scores)
            score_part[0, head, target] = grad_scores[0, head, target]
            value_part = torch.zeros_like(at["attn.hook_v"])
            value_part[0, :, head // group] = einops.einsum(
                pattern[0, head, target], grad_z[0, target, head], "q k, q d -> k d"
            )
            gradients.append(
                torch.autograd.grad(
                    [at["attn.hook_attn_scores"], at["attn.hook_v"]], x,
                    [score_part, value_part], retain_graph=True,
                )[0][0]
            )  # fmt: skip
    return torch.stack(gradients)


@torch.no_grad()
def _scores(
    model: Any,
    deltas: _Activations,
    gradients: Float[Tensor, "downstream pos d_model"],
    one_hot: Float[Tensor, "pos group"],
    readable: int | None,
    n_layers: int,
) -> Float[Tensor, "downstream upstream group"]:
    """delta · gradient summed over each group's positions, for every upstream node the
    downstream ones read (the first `readable`; all with None)."""
    parts = []
    for _, contributions in _upstream_by_layer(model, deltas, n_layers):
        per_position = einops.einsum(
            contributions.to(gradients), gradients, "up pos d, down pos d -> down up pos"
        )
        parts.append(
            einops.einsum(per_position, one_hot.to(gradients), "down up pos, pos g -> down up g")
        )
    scores = torch.cat(parts, dim=1)
    return scores if readable is None else scores[:, :readable]


def _edge_table(total: dict[str, Tensor], graph: EdgeGraph) -> pd.DataFrame:
    """The score tensors as one row per edge (heads: every source x target; MLPs and logits:
    source = target)."""
    upstream, groups = graph.upstream, graph.groups
    n_groups = len(groups)
    rows = []
    heads = total["heads"].cpu()  # [layer, head * target, upstream, source]
    for layer in range(graph.n_layers):
        readable = graph.readable(layer)
        for index in range(graph.n_heads * n_groups):
            head, target = divmod(index, n_groups)
            for up in range(readable):
                for source in range(n_groups):
                    rows.append((upstream[up], f"a{layer}.h{head}", groups[source],
                                 groups[target], float(heads[layer, index, up, source])))  # fmt: skip
    mlp = total["mlp"].cpu()
    for layer in range(graph.n_layers):
        for up in range(graph.readable(layer, mlp=True)):
            for source in range(n_groups):
                rows.append((upstream[up], f"m{layer}", groups[source], groups[source],
                             float(mlp[layer, up, source])))  # fmt: skip
    logits = total["logits"].cpu()
    for up in range(len(upstream)):
        for source in range(n_groups):
            rows.append((upstream[up], "logits", groups[source], groups[source],
                         float(logits[up, source])))  # fmt: skip
    return pd.DataFrame(rows, columns=["upstream", "downstream", "source", "target", "score"])


# ---------------------------------------------------------------------------------------------
# Exact edge patching


@dataclass
class _EdgeMasks:
    """For every downstream node, the weight (0 to 1) with which each (upstream node, source
    group) edge carries the other run's value: `heads` ``[layer, head, target, upstream,
    source]``, `mlp` ``[layer, upstream, source]``, `logits` ``[upstream, source]``."""

    heads: Tensor
    mlp: Tensor
    logits: Tensor

    @classmethod
    def empty(cls, graph: EdgeGraph) -> _EdgeMasks:
        n_up, n_groups = len(graph.upstream), len(graph.groups)
        heads = torch.zeros(graph.n_layers, graph.n_heads, n_groups, n_up, n_groups)
        return cls(heads, torch.zeros(graph.n_layers, n_up, n_groups), torch.zeros(n_up, n_groups))

    @classmethod
    def full(cls, graph: EdgeGraph) -> _EdgeMasks:
        masks = cls.empty(graph)
        for layer in range(graph.n_layers):
            masks.heads[layer, :, :, : graph.readable(layer)] = 1
            masks.mlp[layer, : graph.readable(layer, mlp=True)] = 1
        masks.logits[:] = 1
        return masks

    def set(self, graph: EdgeGraph, edge: Any, value: float) -> None:
        up = graph.upstream.index(edge.upstream)
        source, target = graph.groups.index(edge.source), graph.groups.index(edge.target)
        if edge.downstream == "logits":
            self.logits[up, source] = value
        elif edge.downstream.startswith("m"):
            self.mlp[int(edge.downstream[1:]), up, source] = value
        else:
            layer, head = (int(part[1:]) for part in edge.downstream.split("."))
            self.heads[layer, head, target, up, source] = value


def _run_with_edges(
    model: Any,
    inp: Any,
    other: _Activations,
    masks: _EdgeMasks,
    graph: EdgeGraph,
    metric: Metric,
) -> float:
    """The metric of `inp`'s run in which each downstream node reads, for each masked edge,
    `other`'s upstream output in place of this run's (weighted by the mask).

    A head's inputs differ by target group, so each (head, target) whose edges are masked
    runs the layer's attention on its own copy of the input (side by side in a batch) and
    keeps its own output at the target's rows; MLPs and the logits read per position."""
    n_layers = model.cfg.n_layers
    group_of = graph.group_of
    # this run's outputs minus the other run's, filled in as the layers run
    current = _Activations(other.embed, torch.zeros_like(other.input), [], [])
    block_inputs: list[Tensor] = []
    attention_arguments: dict[int, dict] = {}
    nested = [False]

    def additions(mask: Tensor, n_up_layers: int, like: Tensor) -> Tensor:
        """Per downstream row of `mask` ``[down, upstream, source]``, what to add at each
        position: sum over masked edges of (other - this run)."""
        weights = mask[..., group_of].to(like)  # [down, upstream, pos]
        total = torch.zeros(mask.shape[0], *like.shape, dtype=like.dtype, device=like.device)
        for first, contributions in _upstream_by_layer(model, current, n_up_layers):
            block = weights[:, first : first + contributions.shape[0]]
            total -= einops.einsum(
                block, contributions.to(like), "down up pos, up pos d -> down pos d"
            )
        return total

    def keep_input(resid: Tensor, hook: Any) -> None:
        if not block_inputs:  # the first block's: the input node
            current.input = resid[0] - other.input
        block_inputs.append(resid)

    def keep_arguments(layer: int, module: Any, args: tuple, kwargs: dict) -> None:
        if not nested[0]:
            attention_arguments[layer] = kwargs

    def heads(z: Tensor, hook: Any) -> Tensor:
        if nested[0]:
            return z
        layer = int(hook.name.split(".")[1])
        block = model.blocks[layer]
        mask = masks.heads[layer].flatten(0, 1)  # [head * target, upstream, source]
        active = mask.flatten(1).abs().amax(1).nonzero().flatten().tolist()
        z = z.clone()
        if active:
            x = block_inputs[layer]
            added = additions(mask[active], layer, x[0])
            variants = x + added  # [variant, pos, d_model]
            kwargs = {
                key: _broadcast(value, len(active))
                for key, value in attention_arguments[layer].items()
            }
            seen: dict[str, Tensor] = {}
            nested[0] = True
            try:
                with HookScope(model, [(hook.name, lambda t, hook: seen.setdefault("z", t))]):
                    block.attn(block.ln1(variants), **kwargs)
            finally:
                nested[0] = False
            for variant, index in enumerate(active):
                head, target = divmod(index, len(graph.groups))
                rows = (group_of == target).to(z.device)
                z[0, rows, head] = seen["z"][variant, rows, head]
        current.z.append(z[0] - other.z[layer])
        return z

    def mlp_input(layer: int, module: Any, args: tuple) -> tuple:
        mask = masks.mlp[layer][None]
        if not mask.any():
            return args
        resid = args[0]
        return (resid + additions(mask, layer + 1, resid[0]),)

    def record_mlp(out: Tensor, hook: Any) -> None:
        current.mlp.append(out[0] - other.mlp[len(current.mlp)])

    def logits_input(resid: Tensor, hook: Any) -> Tensor:
        return resid + additions(masks.logits[None], n_layers, resid[0])

    fwd_hooks = []
    for layer in range(n_layers):
        fwd_hooks += [
            (f"blocks.{layer}.hook_resid_pre", keep_input),
            (f"blocks.{layer}.attn.hook_z", heads),
            (f"blocks.{layer}.hook_mlp_out", record_mlp),
        ]
    fwd_hooks.append((f"blocks.{n_layers - 1}.hook_resid_post", logits_input))
    # The attention's arguments (rotary, mask) and the MLP's input are not at hook points.
    pre_hooks = []
    for layer, block in enumerate(model.blocks):
        pre_hooks += [(block.attn, functools.partial(keep_arguments, layer), True),
                      (block.ln2, functools.partial(mlp_input, layer), False)]  # fmt: skip
    with torch.no_grad(), ModuleHooks(pre_hooks), HookScope(model, fwd_hooks):
        return metric(model(inp)).item()


def _broadcast(value: Any, n: int) -> Any:
    """An attention argument for a batch of `n` copies of a one-prompt batch."""
    if isinstance(value, Tensor) and value.dim() and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    if isinstance(value, tuple):
        return tuple(_broadcast(part, n) for part in value)
    return value
