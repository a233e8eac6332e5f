"""A self-contained HTML report of both papers' analyses on one model and a set of VQA samples
with ground-truth boxes (what `mmlens demo` writes for the shipped model).

Every section has a plotly figure and a short text with the numbers it shows; LLaVA-CAM and
attention are scored against the questions' boxes (mass inside the box vs the box's area share,
pointing-game hits), so the report states numbers rather than impressions.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from tqdm.auto import tqdm

from mmlens import plot
from mmlens.analysis import (
    answer_token_variants,
    attention_share,
    cliff_layer,
    correct_answers,
    knockout_sweep,
    llava_cam,
    logit_lens,
)
from mmlens.analysis.grounding import box_scores, last_row_attention_maps
from mmlens.analysis.sweep import PAPER_FLOWS, PATCH_FLOWS
from mmlens.inputs import input_settings


@dataclass
class Section:
    title: str
    text: str
    figure: go.Figure | None = None


NO_EFFECT = 0.05
"""Below this size (percentage points) a mean relative change prints as 0.0%: the report calls
a flow's effect "no effect" unless some window's mean change reaches it with a 95% interval
that excludes 0 (docs/analyses.md, "Intervals")."""

MAX_LISTED = 10
"""Wrongly answered samples listed by the report (the rest are counted)."""


def write_report(
    model: Any,
    samples: Sequence[Any],
    path: str | Path,
    *,
    n_cam_samples: int = 3,
    window_size: int = 3,
    progress: bool = True,
) -> Path:
    """Run the analyses on `samples` (objects with `image`, `question`, `answer`, `boxes`,
    `question_type`) and write one self-contained HTML file to `path`.

    As the Cross-modal paper, the analyses use the correctly answered samples (all of them if
    none is); the report lists the others with the model's answer beside the gold one. Flows
    and scores that need the question's boxes use those of them with boxes, and each section
    says how many samples it averages ("26 of the 28 correctly answered samples").

    Examples:
        >>> write_report(model, mmlens.zoo.shapes.generate(7, seed=1), "report.html", progress=False)
        PosixPath('report.html')
    """
    inputs = [model.prepare(sample.image, sample.question) for sample in samples]
    replies, correct = [], []
    for sample, inp in zip(
        tqdm(samples, desc="answers", disable=not progress), inputs, strict=True
    ):
        with torch.no_grad():
            last_logits = model(inp)[:, -1]
        correct.append(bool(correct_answers(model, inp, sample.answer, last_logits)))
        replies.append(model.to_string(last_logits.argmax(-1)).strip())
    sections = [_accuracy_section(samples, correct, replies)]
    analysed = Analysed(
        [i for i, right in enumerate(correct) if right] or list(range(len(samples))),
        answered_correctly=any(correct),
    )
    with_boxes = [i for i in analysed.indices if samples[i].boxes]
    if not with_boxes:
        raise ValueError(
            "no analysed sample refers to an object in its image (all have empty boxes): "
            "the box flows and scores need samples with boxes"
        )

    # Where image tokens are not patches (learned queries), no image token shows a box.
    patch_flows = PATCH_FLOWS if model.image_tokens_are_patches else {}
    sweep = _knockout(model, samples, inputs, PAPER_FLOWS, analysed.indices, window_size, progress)
    if patch_flows:
        box_sweep = _knockout(
            model, samples, inputs, patch_flows, with_boxes, window_size, progress
        )
        sweep = pd.concat([sweep, box_sweep], ignore_index=True).__finalize__(sweep)
    sections.append(_sweep_section(sweep, analysed, list(patch_flows), len(with_boxes)))
    first = analysed.indices[0]
    answer = samples[first].answer
    lens = logit_lens(model, inputs[first], answer_token_variants(model, inputs[first], answer))
    sections.append(_lens_section(lens, samples[first]))
    share = attention_share(model, inputs[first])
    sections.append(_share_section(share))
    sections += _cam_sections(
        model,
        [samples[i] for i in with_boxes[:n_cam_samples]],
        [inputs[i] for i in with_boxes[:n_cam_samples]],
        progress,
    )
    sections.append(
        _attention_box_section(
            model, [samples[i] for i in with_boxes], [inputs[i] for i in with_boxes], analysed
        )
    )
    # One sample of the report's few dozen is ~4%: at the default 2% a single flip hides the cliff.
    cliff = cliff_layer(
        model,
        [inputs[i] for i in analysed.indices],
        [samples[i].answer for i in analysed.indices],
        tolerance=0.05,
        progress=progress,
    )
    sections.append(_cliff_section(cliff, analysed))

    path = Path(path)
    path.write_text(_html(model, sections, input_settings(inputs)), encoding="utf-8")
    return path


@dataclass
class Analysed:
    """The samples the analyses use (indices into the report's samples)."""

    indices: list[int]
    answered_correctly: bool

    def of(self, count: int) -> str:
        """`count` of them, in words.

        >>> Analysed([0, 2, 3], answered_correctly=True).of(2)
        '2 of the 3 correctly answered samples'
        >>> Analysed([0, 1], answered_correctly=False).of(2)
        'all 2 samples'
        """
        which = "correctly answered samples" if self.answered_correctly else "samples"
        whole = len(self.indices)
        return f"all {whole} {which}" if count == whole else f"{count} of the {whole} {which}"


def _knockout(
    model: Any,
    samples: Sequence[Any],
    inputs: Sequence[Any],
    flows: dict[str, Any],
    indices: list[int],
    window_size: int,
    progress: bool,
) -> pd.DataFrame:
    """`knockout_sweep` of `flows` on the samples at `indices`; rows name the report's sample
    index and its question type."""
    sweep = knockout_sweep(model, [inputs[i] for i in indices], flows, window_size,
                           boxes=[samples[i].boxes for i in indices], progress=progress)  # fmt: skip
    sweep["sample"] = [indices[row] for row in sweep["sample"]]
    sweep["question_type"] = [samples[i].question_type for i in sweep["sample"]]
    return sweep


def _accuracy_section(samples: Sequence[Any], correct: list[bool], replies: list[str]) -> Section:
    by_type: dict[str, list[tuple[bool, bool]]] = {}
    for sample, right in zip(samples, correct, strict=True):
        by_type.setdefault(sample.question_type, []).append((right, not sample.boxes))
    rows = "".join(
        f"<tr><td>{html.escape(kind)}</td><td>{sum(r for r, _ in marks)}/{len(marks)}</td>"
        f"<td>{sum(b for _, b in marks)}</td></tr>"
        for kind, marks in by_type.items()
    )
    example = samples[0]
    text = (
        f"{len(samples)} samples, {sum(correct)} answered correctly (the greedy first answer "
        "token is the answer's first sub-word), per question type:"
        "<table><tr><th>type</th><th>correct</th><th>without boxes</th></tr>"
        f"{rows}</table>"
        f"Example: <i>{html.escape(example.question)}</i> → <b>{html.escape(example.answer)}</b>."
    )
    wrong = [i for i, right in enumerate(correct) if not right]
    if wrong:
        lead = (
            "No sample was answered correctly: the analyses below use all of them. What the model answered:"
            if len(wrong) == len(samples)
            else f"Left out of the analyses below, the {len(wrong)} wrongly answered samples:"
        )
        listed = "".join(
            f"<tr><td>{html.escape(samples[i].question)}</td><td>{html.escape(samples[i].answer)}</td>"
            f"<td>{html.escape(replies[i])}</td></tr>"
            for i in wrong[:MAX_LISTED]
        )
        more = f" and {len(wrong) - MAX_LISTED} more" if len(wrong) > MAX_LISTED else ""
        text += (
            f"<br>{lead}<table><tr><th>question</th><th>answer</th><th>model's first token</th>"
            f"</tr>{listed}</table>{more}"
        )
    return Section("Model and samples", text)


def _sweep_section(
    sweep: pd.DataFrame, analysed: Analysed, box_flows: list[str], n_with_boxes: int
) -> Section:
    curves = plot.knockout_curves(sweep)
    effects = "; ".join(
        f"{html.escape(flow)}: {_effect(curve)}"
        for flow, curve in curves.groupby("flow", sort=False)
    )
    samples = f"Samples: {analysed.of(len(analysed.indices))}"
    if box_flows:
        without = len(analysed.indices) - n_with_boxes
        samples += (
            f"; the flows from the question's own patches ({', '.join(map(html.escape, box_flows))}) "
            f"need its boxes and use {analysed.of(n_with_boxes)}"
            + (
                f" ({without} {'asks' if without == 1 else 'ask'} about no object in the image)"
                if without
                else ""
            )  # fmt: skip
        )
    text = (
        f"Attention knockout (Cross-modal Information Flow, eq. 7): each flow's edges are blocked in a "
        f"window of {sweep.attrs['window_size']} layers centred on each layer; the curve is the mean relative "
        "change of the probability of the clean prediction with a 95% bootstrap interval "
        "(docs/analyses.md, &ldquo;Intervals&rdquo;), one panel per question type. "
        f"{samples}. Over all types: {effects}. &ldquo;No effect&rdquo;: no window's mean change "
        f"reaches {NO_EFFECT}% in size with a 95% interval that excludes 0."
    )
    return Section(
        "Information flow: attention knockout",
        text,
        plot.knockout_sweep(sweep, facet="question_type", columns=4),
    )


def _effect(curve: pd.DataFrame) -> str:
    """A flow's curve (`plot.knockout_curves` rows) in words: its largest clear drop, else its
    largest clear rise, else "no effect" (`NO_EFFECT`)."""
    drops = curve[(curve["mean"] <= -NO_EFFECT) & (curve["high"] < 0)]
    rises = curve[(curve["mean"] >= NO_EFFECT) & (curve["low"] > 0)]
    if len(drops):
        at = drops.loc[drops["mean"].idxmin()]
        kind = "largest drop"
    elif len(rises):
        at = rises.loc[rises["mean"].idxmax()]
        kind = "no drop; largest rise"
    else:
        return "no effect"
    return (
        f"{kind} {at['mean']:+.1f}% (95% interval {at['low']:+.1f}% to {at['high']:+.1f}%) with "
        f"the window centred on layer {int(at['layer'])}"
    )


def _lens_section(lens: Any, sample: Any) -> Section:
    final = lens[lens.layer == lens.layer.max()]
    best = final.loc[final.probability.idxmax()]
    text = (
        f"Logit lens at the last position for <i>{html.escape(sample.question)}</i>: the probability of the "
        f"answer's lower-case and capitalised first sub-word (where the tokenizer can write it) read off the residual stream after each layer "
        f"(final norm applied). After the last layer {best.token_str!r} has p = {best.probability:.2f}."
    )
    return Section("Logit lens", text, plot.logit_lens(lens))


def _share_section(share: Any) -> Section:
    image = share[share.segment == "image"]
    text = (
        "Share of the last position's attention (mean over heads) on system, image and user tokens per "
        f"layer (From Redundancy to Relevance, Figure 2). The image receives between {image.share.min():.0%} "
        f"and {image.share.max():.0%} of it, most at layer {int(image.loc[image.share.idxmax()].layer)}."
    )
    return Section("Attention share", text, plot.attention_share(share))


def _cam_sections(
    model: Any, samples: Sequence[Any], inputs: Sequence[Any], progress: bool
) -> list[Section]:
    layers = list(range(model.cfg.n_layers))
    sections = []
    for sample, inp in zip(
        tqdm(samples, desc="LLaVA-CAM", disable=not progress), inputs, strict=True
    ):
        cam = llava_cam(model, inp, sample.answer, layers=layers, progress=False)
        scores = box_scores(model, inp, sample.boxes, cam.maps)
        best = int(scores["mass_in_box"].argmax())
        text = (
            f"LLaVA-CAM for <i>{html.escape(sample.question)}</i> → {html.escape(sample.answer)}: per decoder "
            f"layer, the answer logits' gradient-weighted post-attention-norm activations over the image patches. "
            f"The question's objects cover {scores['area_share']:.0%} of the patches; the map puts "
            f"{scores['mass_in_box'][best]:.0%} of its mass on them at layer {best}, and its maximum falls on them "
            f"in {int(scores['pointing_hit'].sum())} of {len(layers)} layers."
        )
        sections.append(
            Section(f"LLaVA-CAM: {sample.question_type}", text, plot.llava_cam(cam, inp))
        )
    return sections


def _attention_box_section(
    model: Any, samples: Sequence[Any], inputs: Sequence[Any], analysed: Analysed
) -> Section:
    mass, hits, area = [], [], []
    for sample, inp in zip(samples, inputs, strict=True):
        scores = box_scores(model, inp, sample.boxes, last_row_attention_maps(model, inp))
        mass.append(scores["mass_in_box"])
        hits.append(scores["pointing_hit"].float())
        area.append(scores["area_share"])
    mass_per_layer, hit_rate = torch.stack(mass).mean(0), torch.stack(hits).mean(0)
    figure = go.Figure()
    figure.add_scatter(
        y=mass_per_layer.tolist(), mode="lines+markers", name="attention mass in the boxes"
    )
    figure.add_scatter(y=hit_rate.tolist(), mode="lines+markers", name="pointing-game hit rate")
    figure.add_hline(
        y=sum(area) / len(area), line_dash="dash", annotation_text="boxes' share of the patches"
    )
    figure.update_layout(xaxis_title="layer", yaxis_title="fraction", yaxis_range=[0, 1.02],
                         title="Where the last position's attention to the image goes")  # fmt: skip
    best = int(mass_per_layer.argmax())
    text = (
        f"Ground truth: of the last position's attention to image patches (mean over heads), the share that "
        f"lands on the question's objects, averaged over {analysed.of(len(samples))} that have boxes, against the objects' share of "
        f"the patches ({sum(area) / len(area):.0%}). Highest at layer {best}: {mass_per_layer[best]:.0%} "
        f"(pointing-game hit rate {hit_rate[best]:.0%})."
    )
    return Section("Attention against the ground-truth boxes", text, figure)


def _cliff_section(cliff: Any, analysed: Analysed) -> Section:
    text = (
        f"Accuracy of {analysed.of(len(analysed.indices))} when every image token is removed "
        f"from the sequence from layer l on. Without "
        f"truncation {cliff.baseline:.0%}; "
    )
    if cliff.cliff_layer is None:
        text += (
            f"removing the image costs more than {cliff.tolerance:.0%} even from the last layer "
            "on: this model still reads the image in its last layer, so there is no cliff."
        )
    else:
        text += (
            f"from layer {cliff.cliff_layer} on, removing the image costs at most "
            f"{cliff.tolerance:.0%} — the information-flow cliff: after it, the image has already "
            "been read."
        )
    return Section("Truncating image tokens: the cliff", text, plot.cliff(cliff))


def describe_settings(settings: dict[str, Any]) -> str:
    """One line saying how the inputs were made (template, suffix, image geometry, tiling,
    tokenisation), e.g. for a report header.

    >>> describe_settings(dict(template="vicuna_v1", suffix="", image_mode=None, anyres="hf",
    ...                        tokenization="hf"))
    "template vicuna_v1, no suffix, image mode: the checkpoint's processor, anyres hf, tokenization hf"
    """
    image_mode = settings.get("image_mode") or "the checkpoint's processor"
    return ", ".join(
        [
            f"template {settings.get('template')}",
            f"suffix {settings['suffix']!r}" if settings.get("suffix") else "no suffix",
            f"image mode: {image_mode}",
            f"anyres {settings.get('anyres')}",
            f"tokenization {settings.get('tokenization')}",
        ]
    )


def _html(model: Any, sections: Sequence[Section], settings: dict[str, Any]) -> str:
    parts, plotly_js_included = [], False
    for section in sections:
        figure = ""
        if section.figure is not None:
            # The first figure carries plotly.js inline, so the file works offline on its own.
            figure = section.figure.to_html(
                full_html=False, include_plotlyjs=not plotly_js_included
            )
            plotly_js_included = True
        parts.append(
            f"<section><h2>{html.escape(section.title)}</h2><p>{section.text}</p>{figure}</section>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmlens report</title>"
        f"<style>body{{font-family:sans-serif;max-width:{plot.MAX_WIDTH}px;margin:auto;padding:1em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>"
        f"<h1>mmlens report: {html.escape(Path(str(model.cfg.model_name)).name)}</h1>"
        f"<p>Inputs: {html.escape(describe_settings(settings))} "
        "(docs/semantics.md, &ldquo;Reproducing the papers' settings&rdquo;).</p>"
        + "".join(parts)
        + "</body></html>"
    )
