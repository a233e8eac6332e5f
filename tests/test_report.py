"""The HTML report: every section present, self-contained, ground-truth numbers consistent."""

from __future__ import annotations

import html
from dataclasses import replace

import pandas as pd

import mmlens
from mmlens import plot
from mmlens.report import Analysed, _sweep_section, write_report
from mmlens.zoo.shapes import generate


def test_report_is_self_contained_with_every_section(tiny_checkpoint, tmp_path):
    model = mmlens.from_pretrained(tiny_checkpoint(n_layers=3, image_size=112))
    path = write_report(
        model, generate(4, seed=3), tmp_path / "report.html", n_cam_samples=1, progress=False
    )
    text = path.read_text()
    for title in (
        "Information flow",
        "Logit lens",
        "Attention share",
        "LLaVA-CAM",
        "ground-truth boxes",
        "cliff",
    ):
        assert title in text
    assert text.count("plotly.js v") == 1 and '<script src="http' not in text, (
        "plotly.js inline, once"
    )
    assert text.count('class="plotly-graph-div"') == 6  # sweep, lens, share, one CAM, boxes, cliff
    # A random model answers nothing right: every sample is analysed, and listed with its answer.
    assert "No sample was answered correctly: the analyses below use all of them." in text
    assert text.count("<tr><td>") == 4 + 4  # a row per question type, then each sample
    # The header says how the inputs were made (the checkpoint's defaults here).
    expected = (
        "Inputs: template vicuna_v1, no suffix, image mode: the checkpoint&#x27;s processor, "
        "anyres hf, tokenization hf"
    )
    assert expected in text


def test_the_knockout_text_says_which_samples_it_averages(tmp_path):
    trained = write_report(
        mmlens.load("tiny-shapes"), generate(4, seed=3), tmp_path / "r.html", n_cam_samples=1,
        progress=False,
    ).read_text()  # fmt: skip
    assert " correctly answered samples" in trained
    assert "No sample was answered correctly" not in trained


def test_the_interval_is_a_bootstrap_percentile_one_that_stays_above_minus_100_percent():
    # Three samples lose all of p(answer), one nothing: mean -75%, standard error 25, so mean ±
    # 1.96 standard errors would reach -124%. The resampled means are multiples of 25 between
    # -100 and 0: P(all four draws are -100) = 0.75**4 = 0.32 > 2.5%, so the low end is -100;
    # P(mean >= -25) = P(3 or 4 zeros) = 4 * 0.25**3 * 0.75 + 0.25**4 = 0.051 > 2.5% while
    # P(mean = 0) = 0.004 < 2.5%, so the high end is -25.
    changes = pd.DataFrame({"flow": "Image→Last", "layer": [0] * 4 + [1], "sample": [0, 1, 2, 3, 0],
                            "relative_change": [-100.0, -100.0, -100.0, 0.0, -40.0]})  # fmt: skip
    curves = plot.knockout_curves(changes)
    assert curves.to_dict("records") == [
        {"flow": "Image→Last", "layer": 0, "mean": -75.0, "low": -100.0, "high": -25.0, "n": 4},
        {"flow": "Image→Last", "layer": 1, "mean": -40.0, "low": -40.0, "high": -40.0, "n": 1},
    ]
    figure = plot.knockout_sweep(changes)
    band, curve = figure.data
    assert list(band.y) == [-25.0, -40.0, -40.0, -100.0] and list(curve.y) == [-75.0, -40.0]


def _sweep(changes: dict[str, list[list[float]]]) -> pd.DataFrame:
    """A knockout result: per flow, per window centre, the samples' relative changes."""
    rows = [
        {"sample": sample, "flow": flow, "layer": layer, "relative_change": value,
         "question_type": "Exist"}
        for flow, layers in changes.items()
        for layer, values in enumerate(layers)
        for sample, value in enumerate(values)
    ]  # fmt: skip
    result = pd.DataFrame(rows)
    result.attrs = {"window_size": 3, "model": "tiny"}
    return result


def test_the_knockout_text_states_drops_with_intervals_and_no_effect_honestly():
    sweep = _sweep(
        {
            "Image→Last": [[-100.0, -100.0, -100.0, 0.0], [-10.0, -10.0, -10.0, -10.0]],
            "Last→Last": [[-0.01, -0.02, -0.01, -0.03], [0.0, 0.0, 0.0, 0.0]],  # prints -0.0%
            "Image→Question": [[-60.0, 40.0, -60.0, 40.0], [0.0] * 4],  # interval holds 0
            "Question→Last": [[0.0] * 4, [20.0, 30.0, 20.0, 30.0]],  # a rise, no drop
        }
    )
    text = _sweep_section(sweep, Analysed([0, 1, 2, 3], True), [], 4).text
    assert (
        "Image→Last: largest drop -75.0% (95% interval -100.0% to -25.0%) with the window "
        "centred on layer 0;" in text
    )
    assert "Last→Last: no effect;" in text and "Image→Question: no effect;" in text
    assert (
        "Question→Last: no drop; largest rise +25.0% (95% interval +20.0% to +30.0%) with the "
        "window centred on layer 1." in text
    )
    assert "Samples: all 4 correctly answered samples." in text
    assert "-0.0%" not in text


def test_sample_counts_add_up_and_wrong_answers_show_the_models_answer(tmp_path):
    model = mmlens.load("tiny-shapes")
    first, second, third = generate(3, seed=3)
    star = generate(1, seed=0)[0]  # "Is the star blue or red?" -> red
    samples = [first, replace(second, boxes=()), replace(star, answer="blue"), third]
    text = write_report(model, samples, tmp_path / "r.html", n_cam_samples=1, progress=False)
    text = html.unescape(text.read_text())
    assert "4 samples, 3 answered correctly" in text
    assert (
        "Left out of the analyses below, the 1 wrongly answered samples:<table><tr><th>question"
        "</th><th>answer</th><th>model's first token</th></tr><tr><td>Is the star blue or red?"
        "</td><td>blue</td><td>red</td></tr></table>" in text
    )
    assert "Samples: all 3 correctly answered samples; the flows from the question's own " in text
    assert "need its boxes and use 2 of the 3 correctly answered samples (1 asks about no " in text
    assert "Related patches\\u2192Question (2 of 3 samples)" in text  # the legend, in JSON
    assert "averaged over 2 of the 3 correctly answered samples that have boxes" in text
    assert "Accuracy of all 3 correctly answered samples when every image token" in text
