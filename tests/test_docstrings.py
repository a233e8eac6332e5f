"""Docstring examples that are self-contained run as doctests. (Examples that show a call on a
model and an input of the reader's, `model`, `inp`, are illustrations; the tutorials run them.)"""

from __future__ import annotations

import doctest
import importlib

import pytest

SELF_CONTAINED = [
    "mmlens.data._files",
    "mmlens.data.shapes",
    "mmlens.experiments.parallel",
    "mmlens.inputs.images",
    "mmlens.loading",
    "mmlens.metrics",
    "mmlens.metrics.answers",
    "mmlens.metrics.chair",
    "mmlens.metrics.pope",
    "mmlens.perf",
    "mmlens.sequence",
    "mmlens.zoo.shapes",
]


@pytest.mark.parametrize("module", SELF_CONTAINED)
def test_docstring_examples_run(module):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testmod(importlib.import_module(module), optionflags=flags)
    assert result.attempted > 0 and result.failed == 0


SELF_CONTAINED_OBJECTS = [
    "mmlens.analysis.lens.answer_variants",
    "mmlens.inputs.geometry.AnyresGrid.for_image",
    "mmlens.inputs.geometry.unpadded_ranges",
    "mmlens.inputs.geometry.box_from_xywh",
    "mmlens.inputs.templates.render",
    "mmlens.report.describe_settings",
    "mmlens.data.sample.DataError",
]


@pytest.mark.parametrize("name", SELF_CONTAINED_OBJECTS)
def test_docstring_examples_of_objects_run(name):
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:split]))
            break
        except ModuleNotFoundError:
            continue
    tests = [test for test in doctest.DocTestFinder().find(module) if test.name == name]
    assert tests and tests[0].examples, f"{name} has no examples"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(tests[0])
    assert runner.failures == 0
