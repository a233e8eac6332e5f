"""The HTML report: every section present, self-contained, ground-truth numbers consistent."""

from __future__ import annotations

import mmlens
from mmlens.report import write_report
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
    assert " correctly answered samples" in trained and "none answered correctly" not in trained
