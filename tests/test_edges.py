"""Edge attribution patching (`mmlens.patching.edges`): the scores are the derivative of exact
edge patching, the exact engine reproduces both runs at its ends, and on the two organisms,
whose routing is known, the circuits found run image -> last (`tiny-shapes`) and image ->
question (`tiny-shapes-routed`), with EAP-IG agreeing with exact patching of the same edges."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.patching import (
    edge_attribution_patching,
    edge_graph,
    edge_patching,
    faithfulness,
    logit_difference,
    top_edges,
)
from mmlens.patching.edges import _baselines, _checked_graph, _EdgeMasks, _run_with_edges
from mmlens.zoo.shapes import counterfactual, generate

ORGANISMS = ("tiny-shapes", "tiny-shapes-routed")


@pytest.fixture(scope="module")
def pairs():
    """Per organism: the model, the colour counterfactual pair and its metric."""
    sample = generate(1, seed=0)[0]
    other = counterfactual(sample)
    result = {}
    for name in ORGANISMS:
        model = mmlens.load(name)
        clean = model.prepare(sample.image, sample.question)
        corrupted = model.prepare(other.image, other.question)
        result[name] = (model, clean, corrupted, logit_difference(model, clean, "red", "blue"))
    return result


@pytest.fixture(scope="module")
def integrated(pairs):
    return {
        name: edge_attribution_patching(*pairs[name], method="eap-ig", steps=8)
        for name in ORGANISMS
    }


def test_an_edge_score_is_the_derivative_of_patching_that_edge():
    """EAP's score of an edge = d metric / d t, where the edge carries t of its clean value
    into the corrupted run (the exact engine, central differences in float64)."""
    model = mmlens.load("tiny-shapes").to(torch.float64)
    sample = generate(1, seed=0)[0]
    other = counterfactual(sample)
    clean = model.prepare(sample.image, sample.question)
    corrupted = model.prepare(other.image, other.question)
    red, blue = (model.to_single_token(word) for word in ("red", "blue"))

    def metric(logits):
        return logits[:, -1, red] - logits[:, -1, blue]

    edges = edge_attribution_patching(model, clean, corrupted, metric, method="eap")
    graph = _checked_graph(model, clean, corrupted, None)
    _, _, clean_acts, _ = _baselines(model, clean, corrupted, metric)
    kinds = [edges.downstream.str.startswith(prefix) for prefix in ("a", "m", "logits")]
    chosen = [top_edges(edges[kind], 2) for kind in kinds]  # heads, MLPs, logits
    cross = edges[(edges.source != edges.target) & (edges.score.abs() > 0.05)]
    # a head into its own layer's MLP (the MLP reads the heads that ran just before it)
    same_layer = edges.upstream.str.startswith("a") & edges.downstream.str.startswith("m")
    same_layer &= edges.upstream.str.split(".").str[0].str[1:] == edges.downstream.str[1:]
    chosen += [top_edges(cross, 2), top_edges(edges[same_layer], 2)]
    for _, edge in [row for rows in chosen for row in rows.iterrows()]:
        values = []
        for step in (1e-2, -1e-2):
            masks = _EdgeMasks.empty(graph)
            masks.heads, masks.mlp, masks.logits = (
                t.double() for t in (masks.heads, masks.mlp, masks.logits)
            )
            masks.set(graph, edge, step)
            values.append(_run_with_edges(model, corrupted, clean_acts, masks, graph, metric))
        derivative = (values[0] - values[1]) / 2e-2
        assert derivative == pytest.approx(edge.score, rel=1e-3, abs=1e-4), edge.to_dict()


def test_the_exact_engine_gives_each_run_at_its_ends(pairs, integrated):
    model, clean, corrupted, metric = pairs["tiny-shapes"]
    edges = integrated["tiny-shapes"]
    curve = faithfulness(model, clean, corrupted, metric, edges, sizes=[0, len(edges)])
    # every edge corrupted: every node reads the corrupted stream, so the run is the corrupted one
    assert curve.metric.tolist() == pytest.approx(
        [edges.attrs["corrupted"], edges.attrs["clean"]], abs=1e-4
    )
    assert curve.faithfulness.tolist() == pytest.approx([0.0, 1.0], abs=1e-5)


@pytest.mark.parametrize(
    "name, destination", [("tiny-shapes", "last"), ("tiny-shapes-routed", "question")]
)
def test_the_image_edges_run_where_the_organism_routes(pairs, integrated, name, destination):
    edges = integrated[name]
    leaving = edges[(edges.source == "image") & (edges.target != "image")]
    mass = leaving.score.abs().groupby(leaving.target).sum()
    assert mass[destination] / mass.sum() > 0.98, mass
    assert set(top_edges(leaving, 10).target) == {destination}
    # a small circuit of the top edges alone carries most of the clean behaviour
    curve = faithfulness(*pairs[name], edges, sizes=[100])
    assert curve.faithfulness.item() > 0.9


@pytest.mark.parametrize("name", ORGANISMS)
def test_eap_ig_agrees_with_exact_patching_of_the_same_edges(pairs, integrated, name):
    exact = edge_patching(*pairs[name], top_edges(integrated[name], 30))
    assert exact.score.corr(exact.effect) > 0.9
    top = exact.head(10)
    assert (top.score * top.effect > 0).all(), top[["score", "effect"]]


def test_position_groups_are_any_partition(pairs):
    """Edges by image region: the image split into its left and right halves gives edges that
    add up to the image's (scores are sums over positions)."""
    model, clean, corrupted, metric = pairs["tiny-shapes"]
    image = clean.positions("image")
    columns = image.reshape(8, 8)  # the organism's 8 x 8 grid of patches, row by row
    halves = {"left": columns[:, :4].flatten(), "right": columns[:, 4:].flatten()}
    by_half = edge_attribution_patching(model, clean, corrupted, metric, method="eap",
                                        groups=halves)  # fmt: skip
    whole = edge_attribution_patching(model, clean, corrupted, metric, method="eap",
                                      groups={"image": image})  # fmt: skip
    assert edge_graph(model, clean, halves).groups == ("left", "right", "other")
    into_logits = by_half[(by_half.downstream == "m0") & by_half.source.isin(["left", "right"])]
    summed = into_logits.groupby("upstream").score.sum()
    expected = whole[(whole.downstream == "m0") & (whole.source == "image")].set_index("upstream")
    assert summed.to_dict() == pytest.approx(expected.score.to_dict(), abs=1e-5)


def test_bad_arguments_name_the_problem(pairs):
    model, clean, corrupted, metric = pairs["tiny-shapes"]
    longer = model.prepare(generate(1, seed=0)[0].image, "Is the big star blue or red?")
    with pytest.raises(ValueError, match="different layouts"):
        edge_attribution_patching(model, clean, longer, metric)
    with pytest.raises(ValueError, match="nothing for patching to restore"):
        edge_attribution_patching(model, clean, clean, metric)
    with pytest.raises(ValueError, match="method must be one of"):
        edge_attribution_patching(model, clean, corrupted, metric, method="acdc")
    with pytest.raises(ValueError, match="shares positions"):
        edge_graph(model, clean, {"a": torch.tensor([1, 2]), "b": torch.tensor([2])})
    with pytest.raises(ValueError, match="outside"):
        edge_graph(model, clean, {"a": torch.tensor([10_000])})
