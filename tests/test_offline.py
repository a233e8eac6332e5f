"""Tutorials and the report draw their figures with no network: plotly.js is written in once,
and nothing loads from a CDN (docs/analyses.md, "Figures offline")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
import pytest
from plotly.io import _base_renderers

import mmlens
from mmlens import plot
from mmlens.report import write_report
from mmlens.zoo.shapes import generate

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
PLOTLY_JS = re.compile(r"<script[^>]*>\s*/\*\*\s*\* plotly\.js v.*?</script>", re.S)
NETWORK = re.compile(
    r"cdn\.plot\.ly|cdn\.jsdelivr|cdnjs\.cloudflare|unpkg\.com|require\.config"
    r"|src=[\"']?https?://|import\s*[\"']https?://"
)


def network_loads(page: str) -> tuple[int, list[str]]:
    """The copies of plotly.js in `page`, and whatever else in it loads from the network. The
    bundle's own addresses (map tiles and fonts it fetches only for map figures) are left out."""
    return len(PLOTLY_JS.findall(page)), NETWORK.findall(PLOTLY_JS.sub("", page))


def test_the_offline_renderer_writes_plotly_js_once_and_loads_nothing(monkeypatch):
    written: list[str] = []
    monkeypatch.setattr(
        _base_renderers.ipython_display, "display_html", lambda html, raw: written.append(html)
    )
    before = pio.renderers.default
    try:
        plot.offline_notebook()
        renderer = pio.renderers[pio.renderers.default]
        renderer.activate()  # what the first figure shown in a notebook triggers
        for y in ([1, 2], [3, 1]):
            written.append(
                renderer.to_mimebundle(go.Figure(go.Scatter(y=y)).to_dict())["text/html"]
            )
    finally:
        pio.renderers.default = before
    page = "".join(written)
    assert network_loads(page) == (1, [])
    assert page.count("Plotly.newPlot(") == 2


def test_network_loads_finds_what_a_cdn_renderer_writes():
    connected = go.Figure().to_html(include_plotlyjs="cdn", include_mathjax="cdn")
    assert network_loads(connected) == (
        0,
        ['src="https://', "cdnjs.cloudflare", 'src="https://', "cdn.plot.ly"],
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_the_committed_tutorials_carry_plotly_js_and_a_png_of_every_figure(notebook):
    outputs = [output.get("data", {}) for cell in json.loads(notebook.read_text())["cells"]
               for output in cell.get("outputs", [])]  # fmt: skip
    page = "".join("".join(data.get("text/html", "")) for data in outputs)
    figures = [
        data for data in outputs if 'class="plotly-graph-div"' in "".join(data.get("text/html", ""))
    ]
    assert figures, "every tutorial draws figures"
    assert network_loads(page) == (1, []), (
        "plotly.js once, nothing from a CDN: run `make notebooks`"
    )
    assert all("image/png" in data for data in figures), "a PNG of each figure for GitHub"


def test_a_written_report_loads_nothing_from_the_network(tmp_path):
    path = write_report(mmlens.load("tiny-shapes"), generate(2, seed=3), tmp_path / "r.html",
                        n_cam_samples=1, progress=False)  # fmt: skip
    page = path.read_text()
    assert network_loads(page) == (1, [])
    assert page.count('class="plotly-graph-div"') == 6
