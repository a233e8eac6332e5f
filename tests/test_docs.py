"""Every ```python block of docs/*.md runs, so that documented calls match the code (as the
README's first block does, tests/test_readme.py).

The blocks of a page run in order in one namespace, which starts with the names the pages use:
`model` (the shipped organism, ``mmlens.load("tiny-shapes")``; on the pages whose examples name
layers of a 7B model, a random LLaVA-1.5 of its depth, 32 decoder and 24 vision layers),
`sample` (the first ``generate(1, seed=0)`` sample), `image`, `image_a`, `image_b`, `inp`
(``model.prepare(image, sample.question)``), `samples` / `data` (two shapes samples),
`mmlens`, `torch` and `plot`. A checkpoint a block loads by name is a random one of the same
family and layout built here (`CHECKPOINTS`; `device="cuda"` stays on the CPU). Blocks run in a
scratch folder holding small files in the published layouts and finished runs of the organism
at the paths the pages name (tests/published_formats.py); `figure.show()` renders the figure to
HTML. A block that needs what no test has offline says so on the line before it,
``<!-- not run: needs the 13B checkpoint and GQA -->``; they stay few.

Every ``mmlens`` command line the pages show (shell blocks and inline code) parses: its
subcommand, experiment, options and their values are the command line's.
"""

from __future__ import annotations

import argparse
import re
import shlex
import textwrap
from collections.abc import Callable
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from published_formats import build_workspace
from test_original_checkpoint import write_original

import mmlens
from mmlens import loading
from mmlens.testing import (
    build_tiny_instructblip,
    build_tiny_internvl,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_llava_onevision,
    build_tiny_qwen2_vl,
    build_tiny_qwen_vl,
)
from mmlens.zoo.shapes import generate

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(
    r"(?:^[ \t]*<!-- not run: (?P<reason>[^>]*?) -->\n)?^(?P<indent>[ \t]*)```python\n(?P<code>.*?)^[ \t]*```",
    re.S | re.M,
)
SEVEN_B_LAYERS = {"ablations.md", "analyses.md"}
"""Pages whose examples name layers of a 7B model (layer 15 of 32, vision.blocks.22)."""


def _original_llava_1_5(folder: Path) -> Path:
    return write_original(build_tiny_llava(folder / "hf"), folder)


CHECKPOINTS: dict[str, Callable[[Path], Path]] = {
    "/models/llava-1.5-7b-hf": build_tiny_llava,
    "llava-hf/llava-1.5-7b-hf": build_tiny_llava,
    "/models/llava-v1.5-7b": _original_llava_1_5,
    "llava-hf/llava-v1.6-mistral-7b-hf": build_tiny_llava_next,
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": build_tiny_llava_onevision,
    "Qwen/Qwen2-VL-7B-Instruct": build_tiny_qwen2_vl,
    "/models/Qwen-VL-Chat": build_tiny_qwen_vl,
    "OpenGVLab/InternVL3-2B-hf": build_tiny_internvl,
    "Salesforce/instructblip-vicuna-7b": build_tiny_instructblip,
}
"""The checkpoints the pages load by name, and how to build a random one of the same layout."""


def docs_blocks() -> list[tuple[str, int, str, str | None]]:
    """(page, line, code, reason it is not run or None) of every python block of docs/*.md."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            found.append((page.name, line, textwrap.dedent(match["code"]), match["reason"]))
    return found


BLOCKS = docs_blocks()
RUN = [block for block in BLOCKS if block[3] is None]


def test_only_blocks_that_need_a_checkpoint_or_data_set_are_not_run():
    not_run = [f"{page}:{line}: {reason}" for page, line, _, reason in BLOCKS if reason]
    assert len(RUN) >= 25 and len(not_run) <= 3, not_run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = build_workspace(tmp_path_factory.mktemp("docs"))
    model = mmlens.load("tiny-shapes")
    for experiment, out, options in [
        ("module-jaccard", "jaccard", {"window": 3}),
        ("attention-share", "share", {}),
        ("cam", "cam", {"layers": [0, 5], "n_samples": 1}),
    ]:
        mmlens.run(
            experiment, model, "shapes:7", out=root / "runs" / out, progress=False, **options
        )
    # The names the pages' commands give the runs.
    for name, made in [
        ("knockout-13b", "knockout"),
        ("lens-13b", "lens"),
        ("pope-trunc", "truncation"),
    ]:
        (root / "runs" / name).symlink_to(root / "runs" / made)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Callable[[str], Path]:
    """A page's checkpoint name -> the folder of its random stand-in (built on first use)."""
    built: dict[str, Path] = {}

    def folder(name: str) -> Path:
        if name not in built:
            built[name] = CHECKPOINTS[name](tmp_path_factory.mktemp("checkpoint"))
        return built[name]

    return folder


@pytest.fixture(scope="module")
def namespaces() -> dict[str, dict]:
    """Per page, the namespace its blocks share, and how many of them ran."""
    return {}


def page_names(page: str, seven_b_model: Callable[[], Path]) -> dict:
    model = mmlens.load("tiny-shapes")
    if page in SEVEN_B_LAYERS:
        model = mmlens.from_pretrained(seven_b_model())
    sample, other = generate(2, seed=0)
    return {
        "mmlens": mmlens, "torch": torch, "plot": mmlens.plot, "model": model, "sample": sample,
        "image": sample.image, "image_a": sample.image, "image_b": other.image,
        "inp": model.prepare(sample.image, sample.question),
        "samples": generate(2, seed=3), "data": generate(2, seed=3),
    }  # fmt: skip


@pytest.mark.parametrize("block", RUN, ids=[f"{page}:{line}" for page, line, _, _ in RUN])
def test_the_docs_python_block_runs(
    block, namespaces, workspace, checkpoints, tiny_checkpoint, monkeypatch
):
    page, line, code, _ = block
    monkeypatch.chdir(workspace)
    resolve, from_pretrained = loading.resolve_checkpoint, mmlens.from_pretrained
    monkeypatch.setattr(loading, "resolve_checkpoint",
                        lambda name: checkpoints(name) if name in CHECKPOINTS else resolve(name))  # fmt: skip
    monkeypatch.setattr(mmlens, "from_pretrained",
                        lambda name, device=None, **options: from_pretrained(name, **options))  # fmt: skip
    monkeypatch.setattr(go.Figure, "show", lambda figure, *args, **kwargs: figure.to_html())
    if page not in namespaces:
        seven_b = lambda: tiny_checkpoint(n_layers=32, vision_layers=24)  # noqa: E731
        namespaces[page] = {"ran": 0, "names": page_names(page, seven_b)}
    state = namespaces[page]
    # The page's earlier blocks first (they set up this one), when it runs alone (`-k`).
    earlier = [block for block in RUN if block[0] == page and block[1] < line]
    for _, earlier_line, earlier_code, _ in earlier[state["ran"] :]:
        exec(compile(earlier_code, f"{page}:{earlier_line}", "exec"), state["names"])
    exec(compile(code, f"{page}:{line}", "exec"), state["names"])
    state["ran"] = len(earlier) + 1


SHELL = re.compile(r"```(?:bash|sh|console)\n(.*?)```", re.S)
INLINE = re.compile(r"`(mmlens [^`]*--[^`]*)`")  # a command with options, not a mention


def docs_commands() -> list[tuple[str, list[str]]]:
    """(page, argv) of every `mmlens ...` command of docs/*.md, bar those with placeholders
    (`...`, `EXPERIMENT`)."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text()
        shell = [block.replace("\\\n", " ") for block in SHELL.findall(text)]
        lines = [line for block in shell for line in block.splitlines()] + INLINE.findall(text)
        for line in lines:
            words = shlex.split(line, comments=True)
            placeholders = [word for word in words if word == "..." or word.isupper()]
            if words[:1] == ["mmlens"] and not placeholders:
                found.append((page.name, words[1:]))
    return found


COMMANDS = docs_commands()


class Parsed(Exception):
    """Raised with the parsed arguments instead of running the command."""


def test_the_pages_show_command_lines():
    first_words = {argv[0] for _, argv in COMMANDS}
    assert len(COMMANDS) >= 15 and {"run", "apply-delta"} <= first_words
    assert first_words <= {"run", "apply-delta", "--help", "--version"}, first_words


@pytest.mark.parametrize("page, argv", COMMANDS, ids=[" ".join(argv[:2]) for _, argv in COMMANDS])
def test_the_docs_command_line_parses(page, argv, monkeypatch):
    from mmlens.__main__ import main

    parse = argparse.ArgumentParser.parse_args

    def parse_only(parser, args=None, namespace=None):
        raise Parsed(parse(parser, args, namespace))

    if {"--help", "--version"} & set(argv):  # argparse answers these itself, and exits 0
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        return
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(Parsed) as parsed:
        main(argv)
    assert parsed.value.args[0].command == argv[0]
