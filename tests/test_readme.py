"""The README's first Python block runs as it is on a fresh clone (the shipped organism; no
checkpoint or data set to download)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_first_python_block_of_the_readme_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    question, answer = capsys.readouterr().out.strip().split(" -> ")
    sample = namespace["sample"]
    assert question == sample.question and answer.split()[0] == sample.answer
