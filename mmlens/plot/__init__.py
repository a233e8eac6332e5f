"""Plotly figures of the analyses in `mmlens.analysis`, one small function per result type.

Each takes the result an analysis returned (its settings travel with it) and returns a
`plotly.graph_objects.Figure`.

Examples:
    >>> from mmlens.analysis import llava_cam, logit_lens
    >>> figure = mmlens.plot.logit_lens(logit_lens(model, inp, [53]))   # .show() in a notebook
    >>> cam = llava_cam(model, inp, "red", layers=[1, 3], n_samples=1, progress=False)
    >>> mmlens.plot.llava_cam(cam, inp).write_html("cam.html")
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import torch
from jaxtyping import Float
from PIL import Image
from plotly.io._base_renderers import NotebookRenderer
from plotly.subplots import make_subplots

from mmlens.inputs import ImageGeometry
from mmlens.plot.circuits import activation_patching, circuit, faithfulness, probes
from mmlens.plot.style import COLOURS, DASHES, MARKERS, MAX_WIDTH, colour, model_name

if TYPE_CHECKING:
    from mmlens.analysis.cam import CamResult
    from mmlens.analysis.lens import HighNormPatches


SEGMENT_COLOURS = {
    "system": "#636efa",
    "image": "#ef553b",
    "user": "#00cc96",
    "generated": "#ab63fa",
}


def logit_lens(result: pd.DataFrame, facet: str | None = None, columns: int = 3) -> go.Figure:
    """One line per token: its probability at the position over layers (Cross-modal Figure 6).
    A run's results (many samples) show the mean over samples per answer variant
    (lower-case, capitalised), one panel per `facet` value if given.

    Examples:
        >>> from mmlens import analysis
        >>> variants = analysis.answer_token_variants(model, inp, "red")
        >>> figure = logit_lens(analysis.logit_lens(model, inp, variants))
        >>> figure = logit_lens(mmlens.results.load("runs/lens"), facet="question_type")
        >>> len(figure.layout.annotations)        # a panel per question type, each titled
        7
    """
    attrs = result.attrs
    many = "sample_id" in result and result["sample_id"].nunique() > 1
    series = "variant" if many else "token_str"
    figure, panels = _facets(result, facet, columns)
    for index, (row, col, panel) in enumerate(panels):
        curves = panel.groupby([series, "layer"], sort=False)["probability"].mean().reset_index()
        for key, rows in curves.groupby(series, sort=False):
            figure.add_scatter(x=rows["layer"], y=rows["probability"], mode="lines+markers",
                               name=str(key) if many else repr(key), legendgroup=str(key),
                               line_color=colour(curves[series].unique(), key),
                               showlegend=index == 0, row=row, col=col)  # fmt: skip
    norm = {True: "final norm applied", False: "no final norm"}.get(
        attrs.get("apply_final_norm", True),
        "final norm at the last layer only, as the paper's code",
    )
    where = "the last position, mean over samples" if many else f"position {attrs.get('position')}"
    figure.update_layout(
        title=f"Logit lens at {where} ({norm}) - {model_name(attrs.get('model'))}",
        legend_title="answer" if many else "token",
    )
    figure.update_xaxes(title_text="layer (0 = embeddings)")
    figure.update_yaxes(title_text="probability", col=1)
    return figure


def attention_share(result: pd.DataFrame, facet: str | None = None, columns: int = 3) -> go.Figure:
    """Stacked bars: each segment's share of the query's attention per layer (From Redundancy
    to Relevance, Figure 2b); the mean over samples for a run's results, one panel per `facet`
    value if given.

    Examples:
        >>> from mmlens.analysis import attention_share as share
        >>> figure = attention_share(share(model, inp, heads="max"))
        >>> [trace.name for trace in figure.data]
        ['system', 'image', 'user']
    """
    attrs = result.attrs
    figure, panels = _facets(result, facet, columns)
    for index, (row, col, panel) in enumerate(panels):
        shares = panel.groupby(["segment", "layer"], sort=False)["share"].mean().reset_index()
        for segment, rows in shares.groupby("segment", sort=False):
            figure.add_bar(x=rows["layer"], y=rows["share"], name=segment, legendgroup=segment,
                           marker_color=SEGMENT_COLOURS.get(segment), showlegend=index == 0,
                           row=row, col=col)  # fmt: skip
    figure.update_layout(
        barmode="stack",
        title=f"Attention share of the {attrs.get('query', 'last')} query "
        f"({attrs.get('heads', 'mean')} over heads) - {model_name(attrs.get('model'))}",
        legend_title="keys",
    )
    figure.update_xaxes(title_text="layer")
    figure.update_yaxes(title_text="share of attention", range=[0, 1], col=1)
    return figure


def patch_norms(result: HighNormPatches) -> go.Figure:
    """Histogram of the image positions' residual norms with the outlier threshold (Cross-modal
    appendix E, Figure 15).

    Examples:
        >>> from mmlens.analysis import high_norm_patches
        >>> figure = patch_norms(high_norm_patches(model, inp))
    """
    settings = result.settings
    figure = go.Figure(go.Histogram(x=result.image_norms.tolist(), name="image positions"))
    figure.add_vline(x=result.threshold, line_dash="dash",
                     annotation_text=f"threshold {result.threshold:.3g} ({settings['rule']})")  # fmt: skip
    figure.update_layout(
        title=f"Residual norms of image positions at layer {settings['layer']} - "
        f"{model_name(settings['model'])}: {len(result.positions)} above the threshold",
        xaxis_title="L2 norm",
        yaxis_title="image positions",
    )
    return figure


CAM_COLOURS = [
    [0.0, "rgba(0, 0, 255, 0)"],
    [0.35, "rgba(0, 120, 255, 0.25)"],
    [0.65, "rgba(255, 220, 0, 0.55)"],
    [1.0, "rgba(255, 0, 0, 0.8)"],
]
"""LLaVA-CAM's colours: transparent where the map is low, so the image stays readable."""


def llava_cam(
    result: CamResult, inp: Any, columns: int = 4, opacity: float = 1.0, highres: bool = True
) -> go.Figure:
    """One panel per layer: the map over the image as the model saw it.

    A single crop: the image is `inp.pixel_values` un-normalised with the processor's mean and
    std, so the panel shows the real input geometry: pad-to-square bars in the mean colour,
    resize and crop. Each map cell covers its patch (smoothed for display). A dashed box marks
    where the original image lies in that input; the caption says how it got there. A tiled
    image: the maps (the tile token grid's, or with ``highres=False`` the base grid's) cover the
    whole image, drawn at its original size and aspect from the base crop. Where a connector
    merges patches (2 x 2 cells of patches per token), decoder maps show one value per merged block and
    vision maps one per patch. Where image tokens
    are not patches, the maps are on the vision tower's crop and the caption says how decoder
    layers reached it (`CamResult.settings["spread"]`).

    Examples:
        >>> from mmlens.analysis import llava_cam as cam
        >>> figure = llava_cam(cam(model, inp, "red", layers=[0, 3, 5], progress=False), inp)
    """
    settings = result.settings
    image = settings["image"]
    geometry = inp.image_geometry[image].vision_view  # the first crop, as the tower saw it
    if result.highres_maps is not None:
        return _tiled_cam(result, inp, columns, opacity, highres)
    crop = result.image_pixels
    if crop is None:  # a result saved without its pixels: the input's first crop
        crop = inp.pixel_values[image]
        crop = crop[0] if crop.ndim == 4 else crop  # a tiling processor's [crop, ...]
    pixels = _model_view(crop, settings["image_mean"], settings["image_std"])
    figure = _maps_on_image(pixels, geometry, result.maps, result.layers, columns, opacity)
    n_rows, patch = math.ceil(len(result.layers) / columns), geometry.patch_size
    figure_width = 240 * min(columns, len(result.layers)) + 120
    lines = _geometry_note(geometry, inp.image_mode).split("<br>")
    if settings.get("spread"):
        lines.append(f"Decoder layers: {settings['spread']}")
    if settings.get("cells_per_token"):
        rows, cols = settings["cells_per_token"]
        lines.append(
            f"Decoder layers: one value per image token, a merged {rows}x{cols} block of "
            f"patches ({rows * patch}x{cols * patch} pixels); vision layers: one per patch."
        )
    # Wrapped to the figure's width (~6.5 px a character at the caption's size): a narrow
    # figure of one or two panels would cut a long line off.
    lines = [part for line in lines for part in textwrap.wrap(line, int((figure_width - 60) / 6.5))]
    note_height = 18 * len(lines)
    noise = f"SmoothGrad sigma={settings['noise_std']}, n={settings['n_samples']}"
    figure.update_layout(
        title=f"LLaVA-CAM of {settings['answer']!r} ({settings['site']}, {noise}) - "
        f"{model_name(settings['model'])}",
        height=260 * n_rows + 66 + note_height,
        width=figure_width,
        margin={"b": 36 + note_height},
    )
    note = "<br>".join(lines)
    figure.add_annotation(text=note, xref="paper", yref="paper", x=0, y=0, yanchor="top",
                          yshift=-24, showarrow=False, xanchor="left", align="left")  # fmt: skip
    return figure


def _maps_on_image(
    pixels: Image.Image,
    geometry: ImageGeometry,
    maps: Any,
    titles: list[str],
    columns: int,
    opacity: float,
    zmax: float = 1.0,
) -> go.Figure:
    """One panel per map ``[rows, cols]`` (one cell per patch): the image as the model saw it,
    the map over it (smoothed, from 0 to `zmax`) and a dashed box where the original image
    lies (`llava_cam`, `feature_map`)."""
    height, width = pixels.height, pixels.width
    patch = geometry.patch_size
    figure = make_subplots(
        rows=math.ceil(len(titles) / columns),
        cols=min(columns, len(titles)),
        subplot_titles=titles,
        horizontal_spacing=0.02,
        vertical_spacing=0.08,
    )
    source = _png_data_uri(pixels)
    x0, y0, x1, y1 = _original_extent(geometry)
    for index, panel_map in enumerate(maps):
        row, col = index // columns + 1, index % columns + 1
        figure.add_trace(go.Image(source=source, hoverinfo="skip"), row=row, col=col)
        figure.add_trace(
            go.Heatmap(
                z=panel_map.tolist(),
                x0=patch / 2 - 0.5,
                dx=patch,
                y0=patch / 2 - 0.5,
                dy=patch,
                zmin=0,
                zmax=zmax,
                zsmooth="best",
                colorscale=CAM_COLOURS,
                opacity=opacity,
                showscale=index == 0,
                name=titles[index],
            ),
            row=row,
            col=col,
        )
        figure.add_shape(type="rect", x0=x0, y0=y0, x1=x1, y1=y1, row=row, col=col,
                         line={"color": "white", "dash": "dash", "width": 1})  # fmt: skip
        figure.update_xaxes(range=[-0.5, width - 0.5], visible=False, row=row, col=col)
        figure.update_yaxes(range=[height - 0.5, -0.5], visible=False, row=row, col=col,
                            scaleanchor=f"x{index + 1 if index else ''}")  # fmt: skip
    return figure


def feature_map(
    model: Any,
    inp: Any,
    sae: Any,
    features: int | list[int],
    item: int = 0,
    columns: int = 4,
    opacity: float = 0.6,
) -> go.Figure:
    """One panel per SAE feature: its activation on each image patch of prompt `item`, drawn
    over the image as the model saw it (`mmlens.sae.patch_activations`; the panels of
    `llava_cam`). One colour scale for all panels, from 0 to the largest activation shown;
    each title gives the feature's peak.

    Examples:
        >>> sae = mmlens.sae.load("tiny-shapes-sae")
        >>> figure = feature_map(model, inp, sae, [0, 1, 2])            # .show()
        >>> grids = mmlens.sae.patch_activations(model, inp, sae)   # [batch, rows, cols, d_sae]
        >>> len(figure.data), [list(row) for row in figure.data[1].z] == grids[0, :, :, 0].tolist()
        (6, True)
    """
    from mmlens.sae import patch_activations

    features = [features] if isinstance(features, int) else list(features)
    unknown = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if unknown:
        raise ValueError(f"features {unknown} do not exist; this SAE has 0..{sae.cfg.d_sae - 1}")
    grids = patch_activations(model, inp.item(item), sae)[0]  # [rows, cols, d_sae]
    maps = grids[:, :, features].permute(2, 0, 1)
    image = inp.image_items.index(item)
    processor = model.processor.image_processor
    pixels = _model_view(model.vision_pixels(inp, image), processor.image_mean, processor.image_std)
    titles = [
        f"feature {f} (max {m:.2f})"
        for f, m in zip(features, maps.amax((1, 2)).tolist(), strict=True)
    ]
    geometry = inp.image_geometry[image].vision_view
    peak = max(maps.max().item(), 1e-6)
    figure = _maps_on_image(pixels, geometry, maps, titles, columns, opacity, zmax=peak)
    n_rows = math.ceil(len(features) / columns)
    figure.update_layout(
        title=f"SAE features at {sae.cfg.hook_name} - {model_name(model.cfg.model_name)}",
        height=260 * n_rows + 80,
        width=240 * min(columns, len(features)) + 120,
    )
    return figure


def _tiled_cam(
    result: CamResult, inp: Any, columns: int, opacity: float, highres: bool
) -> go.Figure:
    """`llava_cam` for a tiled image: maps stretched over the original image."""
    settings = result.settings
    height, width = settings["original_size"]
    base_crop = inp.pixel_values[settings["image"]][0]
    pixels = _model_view(base_crop, settings["image_mean"], settings["image_std"])
    pixels = pixels.resize((width, height), Image.Resampling.BICUBIC)
    maps = result.highres_maps if highres else result.maps
    rows, cols = maps.shape[1:]
    n_rows = math.ceil(len(result.layers) / columns)
    figure = make_subplots(
        rows=n_rows, cols=min(columns, len(result.layers)), subplot_titles=result.layers,
        horizontal_spacing=0.02, vertical_spacing=0.08,
    )  # fmt: skip
    source = _png_data_uri(pixels)
    for index, layer_map in enumerate(maps):
        row, col = index // columns + 1, index % columns + 1
        figure.add_trace(go.Image(source=source, hoverinfo="skip"), row=row, col=col)
        figure.add_heatmap(
            z=layer_map.tolist(), x0=width / cols / 2 - 0.5, dx=width / cols,
            y0=height / rows / 2 - 0.5, dy=height / rows, zmin=0, zmax=1, zsmooth="best",
            colorscale=CAM_COLOURS, opacity=opacity, showscale=index == 0,
            name=result.layers[index], row=row, col=col,
        )  # fmt: skip
        figure.update_xaxes(range=[-0.5, width - 0.5], visible=False, row=row, col=col)
        figure.update_yaxes(range=[height - 0.5, -0.5], visible=False, row=row, col=col,
                            scaleanchor=f"x{index + 1 if index else ''}")  # fmt: skip
    tile_grid = inp.image_geometry[settings["image"]].tile_grid
    grid = tile_grid.describe() if highres else "base grid"
    noise = f"SmoothGrad sigma={settings['noise_std']}, n={settings['n_samples']}"
    panel_height = 240 * height / max(width, 1)
    figure.update_layout(
        title=f"LLaVA-CAM of {settings['answer']!r} ({settings['site']}, {noise}) - "
        f"{model_name(settings['model'])}",
        height=int(panel_height * n_rows) + 160,
        width=240 * min(columns, len(result.layers)) + 120,
        margin={"b": 70},
    )
    figure.add_annotation(
        text=f"original {width}x{height}; map on the {grid} ({rows}x{cols} cells), "
        "stretched over the whole image",
        xref="paper", yref="paper", x=0, y=0, yshift=-45, showarrow=False, xanchor="left",
    )  # fmt: skip
    return figure


def _model_view(pixel_values: torch.Tensor, mean: list[float], std: list[float]) -> Image.Image:
    """The processed image `[channel, height, width]` as RGB: normalisation undone."""
    channels = len(mean)
    pixels = pixel_values.detach().float().cpu() * torch.tensor(std).view(channels, 1, 1)
    pixels = (pixels + torch.tensor(mean).view(channels, 1, 1)).clamp(0, 1)
    return Image.fromarray((pixels * 255).round().byte().permute(1, 2, 0).numpy())


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _original_extent(
    geometry: ImageGeometry,
) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the original image in the processed image's plot coordinates
    (pixel centres at integers), clipped to what the crop kept."""
    edges = []
    for axis in (1, 0):
        scale = geometry.resized_size[axis] / geometry.padded_size[axis]
        start = geometry.pad_offset[axis] * scale - geometry.crop_offset[axis]
        stop = start + geometry.original_size[axis] * scale
        size = geometry.processed_size[axis]
        edges.append((max(start, 0) - 0.5, min(stop, size) - 0.5))
    (x0, x1), (y0, y1) = edges
    return x0, y0, x1, y1


def _geometry_note(geometry: ImageGeometry, image_mode: str | None) -> str:
    """How the original image maps to what the vision tower saw, in two lines."""
    (height, width), (padded_h, padded_w) = geometry.original_size, geometry.padded_size
    steps = [f"original {width}x{height}"]
    if (padded_h, padded_w) != (height, width):
        steps.append(f"padded to {padded_w}x{padded_h} (mean colour)")
    steps.append(f"resized to {geometry.resized_size[1]}x{geometry.resized_size[0]}")
    if geometry.processed_size != geometry.resized_size:
        steps.append(f"centre-cropped to {geometry.processed_size[1]}x{geometry.processed_size[0]}")
    mode = f"image_mode={image_mode!r}" if image_mode else "the checkpoint's processor"
    return (
        f"Image as the model saw it ({mode}): " + ", ".join(steps) + ".<br>Dashed box: the "
        f"original image; one map cell per {geometry.patch_size}x{geometry.patch_size}-pixel patch."
    )


INTERVAL_RESAMPLES = 2000
"""Bootstrap resamples behind each interval of `knockout_curves`."""


def knockout_curves(result: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """The curves `knockout_sweep` draws, as a table: per flow and window centre (and per value
    of each column in `by`), the mean relative change of p(answer) over samples, its 95%
    percentile-bootstrap interval and the number of samples.

    The interval resamples the samples with replacement (`INTERVAL_RESAMPLES` times, a fixed
    seed) and takes the 2.5th and 97.5th percentiles of the resampled means. Each resampled mean
    is a mean of measured changes, so the interval stays where the quantity can be: a
    probability cannot fall by more than all of it (-100%), which mean ± 1.96 standard errors
    of a few samples near -100% would cross. One sample's interval is its own value.
    docs/analyses.md, "Intervals".

    Examples:
        >>> changes = pd.DataFrame({"flow": "Image→Last", "layer": 0, "sample": [0, 1, 2, 3],
        ...                         "relative_change": [-100.0, -100.0, -100.0, 0.0]})
        >>> knockout_curves(changes)
                 flow  layer  mean    low  high  n
        0  Image→Last      0 -75.0 -100.0 -25.0  4
    """
    keys = [*by, "flow", "layer"]
    groups = [(key, rows["relative_change"].to_numpy(float))
              for key, rows in result.groupby(keys, sort=False)]  # fmt: skip
    table = pd.DataFrame(
        [
            (*key, values.mean(), *_bootstrap_interval(values), len(values))
            for key, values in groups
        ],
        columns=[*keys, "mean", "low", "high", "n"],
    )
    order = {flow: index for index, flow in enumerate(result["flow"].unique())}  # as measured
    return table.sort_values(
        keys, key=lambda column: column.map(order) if column.name == "flow" else column
    ).reset_index(drop=True)


def _bootstrap_interval(values: Float[np.ndarray, " n"]) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the means of `INTERVAL_RESAMPLES` resamples of `values`.
    A resample is drawn as counts per value (multinomial), so the means are one matrix product."""
    n = len(values)
    counts = np.random.default_rng(0).multinomial(n, np.full(n, 1 / n), size=INTERVAL_RESAMPLES)
    low, high = np.percentile(counts @ values / n, [2.5, 97.5])
    return float(low), float(high)


def knockout_sweep(result: pd.DataFrame, facet: str | None = None, columns: int = 3) -> go.Figure:
    """Mean relative change of the answer probability per flow over window centres, with a
    95% interval over samples (percentile bootstrap, `knockout_curves`), as the Cross-modal
    paper's Figures 3-5; with `facet` (e.g. ``"question_type"`` of a run's results), one panel
    per value, `columns` panels a row, as the paper's figures per question type. A flow measured
    on fewer of the samples (the box flows need samples with boxes) says how many in the legend.

    Examples:
        >>> figure = knockout_sweep(mmlens.results.load("runs/knockout"), facet="question_type")
        >>> len(figure.layout.annotations)        # a panel per question type
        7
    """
    attrs = result.attrs
    figure, panels = _facets(result, facet, columns)
    colours = {flow: COLOURS[i % len(COLOURS)] for i, flow in enumerate(result.flow.unique())}
    sample = "sample_id" if "sample_id" in result else "sample"
    n_samples = result[sample].nunique()
    per_flow = result.groupby("flow", sort=False)[sample].nunique()
    names = {
        flow: flow if count == n_samples else f"{flow} ({count} of {n_samples} samples)"
        for flow, count in per_flow.items()
    }
    n_rows = max(row for row, _, _ in panels)
    for index, (row, col, panel) in enumerate(panels):
        for flow, stats in knockout_curves(panel).groupby("flow", sort=False):
            colour = colours[flow]
            if stats["n"].max() > 1:  # a one-sample centre's interval is its value
                figure.add_scatter(
                    x=list(stats["layer"]) + list(stats["layer"][::-1]),
                    y=list(stats["high"]) + list(stats["low"][::-1]),
                    mode="lines", fill="toself", fillcolor=colour, opacity=0.2, line_width=0,
                    hoverinfo="skip", showlegend=False, name=f"{flow} 95% interval",
                    row=row, col=col,
                )  # fmt: skip
            style = list(colours).index(flow)  # overlapping curves stay distinguishable
            figure.add_scatter(x=stats["layer"], y=stats["mean"], mode="lines+markers",
                               name=names[flow], legendgroup=flow,
                               line=dict(color=colour, dash=DASHES[style % len(DASHES)]),
                               marker_symbol=MARKERS[style % len(MARKERS)],
                               showlegend=index == 0, row=row, col=col)  # fmt: skip
        figure.update_xaxes(title_text="window centre (layer)" if row == n_rows else None,
                            row=row, col=col)  # fmt: skip
    figure.update_yaxes(title_text="relative change of p(answer) (%)", col=1)
    figure.update_layout(
        title=f"Attention knockout, window {attrs.get('window_size')} - {model_name(attrs.get('model'))} "
        f"({n_samples} sample{'s' if n_samples != 1 else ''})",
        legend_title="blocked flow",
        height=max(450, 320 * n_rows + 80),
    )
    return figure


def module_knockout_jaccard(
    result: pd.DataFrame, facet: str | None = None, columns: int = 3
) -> go.Figure:
    """Jaccard similarity of the question's top-k words per knocked-out window (appendix D/K);
    the mean over samples for a run's results, one panel per `facet` value if given.

    Examples:
        >>> from mmlens.analysis import module_knockout_jaccard as jaccard
        >>> figure = module_knockout_jaccard(jaccard(model, inp, "mlp", progress=False))
    """
    attrs = result.attrs
    figure, panels = _facets(result, facet, columns)
    for index, (row, col, panel) in enumerate(panels):
        means = panel.groupby(["module", "layer"], sort=False)["jaccard"].mean().reset_index()
        for module, rows in means.groupby("module", sort=False):
            figure.add_scatter(x=rows["layer"], y=rows["jaccard"], mode="lines+markers",
                               name=module, legendgroup=module, showlegend=index == 0,
                               line_color=colour(means["module"].unique(), module),
                               row=row, col=col)  # fmt: skip
    figure.update_layout(
        title=f"Semantic change when zeroing {attrs.get('window')} layers from l "
        f"(top-{attrs.get('k')} words at {attrs.get('positions', 'question')}) - "
        f"{model_name(attrs.get('model'))}",
    )
    figure.update_xaxes(title_text="first zeroed layer")
    figure.update_yaxes(title_text="Jaccard similarity to the clean run", range=[0, 1.02], col=1)
    return figure


def cliff(result: Any) -> go.Figure:
    """Accuracy with every image token truncated from layer l on, the baseline, and the cliff.

    Examples:
        >>> from mmlens.analysis import cliff_layer
        >>> figure = cliff(cliff_layer(model, [inp], [sample.answer], progress=False))
    """
    curve = result.curve
    figure = go.Figure()
    figure.add_scatter(
        x=curve["layer"], y=curve["accuracy"], mode="lines+markers", name="truncated from layer"
    )
    figure.add_hline(y=result.baseline, line_dash="dash", annotation_text="no truncation")
    if result.cliff_layer is not None:
        figure.add_vline(
            x=result.cliff_layer,
            line_dash="dot",
            annotation_text=f"cliff: layer {result.cliff_layer}",
            annotation_position="bottom right",  # clear of the baseline's line and label at top
        )
    figure.update_layout(
        title=f"Information-flow cliff - {model_name(curve.attrs.get('model'))} ({curve.attrs.get('n_samples')} samples)",
        xaxis_title="image tokens removed from layer",
        yaxis_title="accuracy",
        yaxis_range=[0, 1.02],
    )
    return figure


def _facets(
    result: pd.DataFrame, facet: str | None, columns: int
) -> tuple[go.Figure, list[tuple[int, int, pd.DataFrame]]]:
    """A figure with one panel per value of column `facet` (one panel without it), `columns`
    panels a row, and each panel's (row, column, rows)."""
    groups = [("", result)] if facet is None else list(result.groupby(facet, sort=True))
    n_rows = math.ceil(len(groups) / columns)
    figure = make_subplots(
        rows=n_rows,
        cols=min(columns, len(groups)),
        subplot_titles=[str(value) for value, _ in groups] if facet else None,
        shared_yaxes=True,
        horizontal_spacing=0.04,
        vertical_spacing=0.12,
    )
    if n_rows > 1:
        figure.update_layout(height=320 * n_rows + 80)
    if len(groups) > 1:  # room for every panel's axis titles, within a page's width
        width = max(700, 280 * min(columns, len(groups)) + 260)
        figure.update_layout(width=min(width, MAX_WIDTH))
    panels = [(i // columns + 1, i % columns + 1, rows) for i, (_, rows) in enumerate(groups)]
    return figure, panels


OFFLINE_RENDERER = "mmlens_offline"
"""The plotly renderer `offline_notebook` registers: plotly's ``notebook`` renderer, without
the MathJax script it loads from a CDN into every figure (no mmlens figure writes TeX)."""


class _OfflineNotebookRenderer(NotebookRenderer):
    def to_mimebundle(self, fig_dict: dict) -> dict[str, str]:
        figure_html = pio.to_html(fig_dict, config=self.config, include_plotlyjs=False,
                                  include_mathjax=False, full_html=False, default_width="100%",
                                  default_height=525, validate=False)  # fmt: skip
        return {"text/html": figure_html}


def offline_notebook(png: bool = False) -> None:
    """Draw this Jupyter notebook's figures with no network: plotly.js from the installed
    plotly is written into the notebook once (with the first figure) and every figure uses it.
    plotly's ``notebook_connected`` renderer loads it from a CDN instead, and its figures stay
    blank on an offline cluster node. With `png`, each figure is also stored as a PNG image
    (for viewers that run no JavaScript, such as GitHub's). docs/analyses.md, "Figures offline".

    Examples:
        >>> import plotly.io as pio
        >>> before = pio.renderers.default
        >>> offline_notebook(png=True)
        >>> pio.renderers.default
        'mmlens_offline+png'
        >>> pio.renderers.default = before
    """
    pio.renderers[OFFLINE_RENDERER] = _OfflineNotebookRenderer()
    pio.renderers.default = f"{OFFLINE_RENDERER}+png" if png else OFFLINE_RENDERER


__all__ = [
    "CAM_COLOURS", "INTERVAL_RESAMPLES", "MAX_WIDTH", "OFFLINE_RENDERER", "SEGMENT_COLOURS",
    "activation_patching", "attention_share", "circuit", "cliff", "faithfulness", "feature_map",
    "knockout_curves", "knockout_sweep", "llava_cam", "logit_lens", "module_knockout_jaccard",
    "offline_notebook", "patch_norms", "probes",
]  # fmt: skip
