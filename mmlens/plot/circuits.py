"""Figures of `mmlens.patching` and `mmlens.probes`: activation and attribution patching
tables, circuits of edges, their faithfulness curves, and probe accuracies (all under
`mmlens.plot`)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mmlens.plot.style import MAX_WIDTH, colour, model_name


def activation_patching(result: pd.DataFrame) -> go.Figure:
    """Heatmaps of `mmlens.patching.activation_patching` (or `attribution_patching`'s
    estimates): the normalised metric (0 = corrupted, 1 = clean) per layer and unit (segment,
    position or head), one panel per site.

    Examples:
        >>> from mmlens.patching import activation_patching as patch, logit_difference
        >>> from mmlens.zoo.shapes import counterfactual
        >>> other = counterfactual(sample)
        >>> corrupted = model.prepare(other.image, other.question)
        >>> metric = logit_difference(model, inp, "red", "blue")
        >>> figure = activation_patching(patch(model, inp, corrupted, metric, progress=False))
        >>> [annotation.text for annotation in figure.layout.annotations]
        ['resid_pre', 'attn_out', 'mlp_out']
    """
    attrs = result.attrs
    sites = list(dict.fromkeys(result.site))
    figure = make_subplots(rows=1, cols=len(sites), subplot_titles=sites, shared_yaxes=True)
    for column, site in enumerate(sites, 1):
        rows = result[result.site == site]
        across = "head" if rows["head"].notna().any() else "unit"
        table = rows.pivot_table(index="layer", columns=across, values="normalized", sort=False)
        figure.add_heatmap(
            z=table.values, x=[str(c) for c in table.columns], y=table.index.tolist(),
            zmin=-1, zmax=1, colorscale="RdBu", reversescale=True, showscale=column == 1,
            colorbar=dict(title="restored"), row=1, col=column,
            hovertemplate="layer %{y}, %{x}: %{z:.2f}<extra>" + site + "</extra>",
        )  # fmt: skip
        figure.update_xaxes(title_text=across if across == "head" else attrs.get("by", ""),
                            row=1, col=column)  # fmt: skip
    figure.update_yaxes(title_text="layer", row=1, col=1)
    kind = (
        f"attribution patching ({attrs.get('method')}), estimated"
        if attrs.get("analysis") == "attribution_patching"
        else "activation patching,"
    )
    figure.update_layout(
        title=f"{model_name(attrs.get('model'))}: {kind} share of the clean "
        f"metric restored (clean {attrs.get('clean', float('nan')):.2f}, corrupted "
        f"{attrs.get('corrupted', float('nan')):.2f})",
        width=min(max(500, 300 * len(sites) + 120), MAX_WIDTH),
        height=420,
    )
    return figure


def circuit(edges: pd.DataFrame | dict[str, pd.DataFrame], title: str | None = None) -> go.Figure:
    """Circuits of `mmlens.patching.edge_attribution_patching` edges (e.g. `top_edges`) over
    the prompt, one panel per circuit (pass a dict, name -> edges, for several side by side):
    layers left to right (the input, each layer's heads then its MLP at +0.5, the logits),
    position groups top to bottom with a layer's heads stacked within their group; each edge a
    line from its upstream node at its source group to its downstream node at its target group,
    as wide as its share of the panel's largest score (blue raises the metric, red lowers it).

    Examples:
        >>> from mmlens.patching import edge_attribution_patching, logit_difference, top_edges
        >>> from mmlens.zoo.shapes import counterfactual
        >>> other = counterfactual(sample)
        >>> corrupted = model.prepare(other.image, other.question)
        >>> metric = logit_difference(model, inp, "red", "blue")
        >>> edges = edge_attribution_patching(model, inp, corrupted, metric, steps=2)
        >>> figure = circuit({"EAP-IG": top_edges(edges, 20), "EAP-IG, 5 edges": top_edges(edges, 5)})
        >>> len([trace for trace in figure.data if trace.mode == "lines"])
        25
    """
    panels = edges if isinstance(edges, dict) else {"": edges}
    figure = make_subplots(
        rows=1, cols=len(panels), subplot_titles=list(panels) if len(panels) > 1 else None,
        shared_yaxes=True, horizontal_spacing=0.05,
    )  # fmt: skip
    shown: set[str] = set()
    for column, panel in enumerate(panels.values(), 1):
        groups = _draw_circuit(figure, panel, column, shown)
        figure.update_xaxes(title_text="layer", row=1, col=column)
    figure.update_yaxes(
        tickvals=list(range(len(groups))), ticktext=groups,
        range=[len(groups) - 0.2, -0.4], title_text="positions", row=1, col=1,
    )  # fmt: skip
    sizes = ", ".join(f"{len(panel)}" for panel in panels.values())
    figure.update_layout(
        title=title or f"circuit ({sizes} edges; heads stacked within a group, MLPs at +0.5)",
        width=min(120 + 620 * len(panels), MAX_WIDTH), height=500,
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1.0),
    )  # fmt: skip
    return figure


def _draw_circuit(figure: go.Figure, edges: pd.DataFrame, column: int, shown: set) -> list[str]:
    """One panel of `circuit`; returns its position groups in prompt order."""
    groups = list(edges.attrs.get("groups") or dict.fromkeys([*edges.source, *edges.target]))
    nodes = [*edges.upstream, *edges.downstream]
    n_layers = edges.attrs.get("n_layers") or 1 + max(map(_layer_of, nodes), default=0)
    n_heads = 1 + max((int(node.split(".h")[1]) for node in nodes if ".h" in node), default=0)
    largest = float(edges.score.abs().max()) if len(edges) else 1.0

    def place(node: str, group: str) -> tuple[float, float]:
        y = float(groups.index(group))
        if node == "input":
            return -1.0, y
        if node == "logits":
            return float(n_layers), y
        if node.startswith("m"):
            return _layer_of(node) + 0.5, y
        return float(_layer_of(node)), y + 0.6 * int(node.split(".h")[1]) / max(n_heads, 2)

    for edge in edges.itertuples():
        (x0, y0), (x1, y1) = place(edge.upstream, edge.source), place(edge.downstream, edge.target)
        sign = "raises the metric" if edge.score > 0 else "lowers the metric"
        figure.add_scatter(
            x=[x0, x1], y=[y0, y1], mode="lines", name=sign, legendgroup=sign,
            showlegend=sign not in shown, opacity=0.7, row=1, col=column,
            line=dict(width=0.5 + 7.5 * abs(edge.score) / largest,
                      color="#2166ac" if edge.score > 0 else "#b2182b"),
            hovertemplate=f"{edge.upstream} ({edge.source}) → {edge.downstream} ({edge.target})"
            f": {edge.score:.3f}<extra></extra>",
        )  # fmt: skip
        shown.add(sign)
    ends = [*zip(edges.upstream, edges.source, strict=True),
            *zip(edges.downstream, edges.target, strict=True)]  # fmt: skip
    placed = {place(node, group): node for node, group in ends}
    figure.add_scatter(
        x=[x for x, _ in placed], y=[y for _, y in placed], mode="markers+text",
        text=[node.split(".")[-1] if ".h" in node else node for node in placed.values()],
        textposition="middle right", textfont=dict(size=10), showlegend=False,
        marker=dict(size=6, color="#333"), row=1, col=column,
        hovertext=list(placed.values()), hoverinfo="text",
    )  # fmt: skip
    figure.update_xaxes(range=[-1.4, n_layers + 0.6], row=1, col=column)
    return groups


def faithfulness(curves: pd.DataFrame | dict[str, pd.DataFrame]) -> go.Figure:
    """`mmlens.patching.faithfulness` curves: the share of the clean metric each circuit size
    restores (one line per curve; pass a dict, name -> curve, for several).

    Examples:
        >>> from mmlens.patching import edge_attribution_patching, faithfulness as evaluate
        >>> from mmlens.patching import logit_difference
        >>> from mmlens.zoo.shapes import counterfactual
        >>> other = counterfactual(sample)
        >>> corrupted = model.prepare(other.image, other.question)
        >>> metric = logit_difference(model, inp, "red", "blue")
        >>> edges = edge_attribution_patching(model, inp, corrupted, metric, method="eap")
        >>> curve = evaluate(model, inp, corrupted, metric, edges, sizes=[10, 100])
        >>> [trace.name for trace in faithfulness({"EAP": curve}).data]
        ['EAP']
    """
    named = curves if isinstance(curves, dict) else {"circuit": curves}
    figure = go.Figure()
    for name, curve in named.items():
        figure.add_scatter(
            x=curve.n_edges, y=curve.faithfulness, mode="lines+markers", name=name,
            line=dict(color=colour(named, name)),
            hovertemplate="%{x} edges: %{y:.2f}<extra>" + name + "</extra>",
        )  # fmt: skip
    figure.add_hline(y=1.0, line=dict(dash="dot", color="#888"))
    figure.update_xaxes(title_text="edges in the circuit", type="log")
    figure.update_yaxes(title_text="share of the clean metric restored")
    figure.update_layout(
        title="circuit faithfulness (every other edge carries its corrupted value)",
        width=760, height=420,
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )  # fmt: skip
    return figure


def _layer_of(node: str) -> int:
    """The layer of an edge node name (``"a3.h1"``, ``"m3"``: 3; the input and logits: -1)."""
    if node in ("input", "logits"):
        return -1
    return int(node[1:].split(".")[0])


def probes(result: pd.DataFrame) -> go.Figure:
    """Held-out accuracy of `mmlens.probes.fit_probes` per layer (rows) and segment (columns),
    the chance level in the title.

    Examples:
        >>> from mmlens.probes import fit_probes
        >>> from mmlens.zoo.shapes import generate
        >>> samples = generate(16, seed=3, question_types=["Exist"])
        >>> inputs = [model.prepare(s.image, s.question) for s in samples]
        >>> figure = probes(fit_probes(model, inputs, [s.answer for s in samples], layers=[0, 5]))
        >>> figure.data[0].x
        ('image', 'question', 'last')
    """
    table = result.pivot_table(index="layer", columns="segment", values="test_accuracy", sort=False)
    figure = go.Figure(
        go.Heatmap(
            z=table.values,
            x=list(table.columns),
            y=table.index.tolist(),
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            colorbar=dict(title="held-out<br>accuracy"),
            texttemplate="%{z:.2f}",
            hovertemplate="layer %{y}, %{x}: %{z:.2f}<extra></extra>",
        )  # fmt: skip
    )
    attrs = result.attrs
    figure.update_layout(
        title=f"Linear probes on {attrs.get('site', '')}: held-out accuracy<br>"
        f"<sup>{len(attrs.get('classes', []))} classes, chance {result.chance.iloc[0]:.2f}, "
        f"{int(result.n_test.iloc[0])} held-out samples</sup>",
        xaxis_title="segment",
        yaxis_title="layer",
        width=560,
        height=460,
    )
    return figure
