"""The rooms keep their rules (docs/architecture.md): family names only behind the family
contract, no import cycle (imports inside functions and under TYPE_CHECKING included), no module
over 800 lines, and every registered family satisfying the contract."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mmlens
from mmlens.models import MODEL_TYPES
from mmlens.models.family import ImageTokenGeometry, TileGrid, VisionLanguageFamily

PACKAGE = Path(mmlens.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))

FAMILY_NAMES = re.compile(
    r"instructblip|qformer|q-former|onevision|llava[_ -]?next|llava-v?1\.6|llava[_ -]interleave|"
    r"qwen\d?[_.-]?\d?[_-]?vl|internvl|gemma(?![ _-]?scope)|shikra|(?-i:\bNeXT\b|\bBLIP)",
    re.IGNORECASE,
)
"""What names a family. Where they may appear: `models/` (the families themselves), the
tiny-checkpoint builders (`testing/`) and the two front doors. "Gemma Scope" names a release
format of sparse autoencoders (`mmlens.sae`), not a family, and may appear anywhere."""
FRONT_DOORS = {PACKAGE / "__init__.py", PACKAGE / "models" / "__init__.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The mmlens modules `path` imports anywhere in its body: a `from package import name`
    counts as an import of the submodule where `name` is one, else of the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return {name for name in found if name in known}


def test_no_file_outside_the_models_names_a_family():
    offenders = []
    for path in MODULES:
        relative = path.relative_to(PACKAGE).parts
        if relative[0] in ("models", "testing") or path in FRONT_DOORS:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FAMILY_NAMES.search(line):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "family names outside mmlens/models:\n" + "\n".join(offenders)


def test_the_family_pattern_finds_what_it_should():
    """The check above can fail: its pattern catches each family's spellings."""
    for text in ("HookedInstructBlip", "LLaVA-NeXT", "llava_next", "LLaVA-OneVision",
                 "the Q-Former", "Qwen2.5-VL", "qwen2_vl", "InternVL", "Gemma 3", "Shikra",
                 "LLaVA-Interleave", "NeXT's tiles", "BLIP-2"):  # fmt: skip
        assert FAMILY_NAMES.search(text), text
    for text in ("next(iter(x))", "the next token", "LLaVA-CAM", "llava_cam", "repeat_interleave",
                 "Gemma Scope 2", "GEMMA_SCOPE_SITES", "gemma-scope-2b-pt-res"):  # fmt: skip
        assert not FAMILY_NAMES.search(text), text


def test_no_import_cycle():
    known = {module_name(path) for path in MODULES}
    graph = {module_name(path): imported_modules(path, known) for path in MODULES}
    # A module's own package __init__ is imported first by Python, and the __init__ of a
    # package re-exports its submodules: that edge is not a cycle of design.
    cycles = []
    for start in graph:
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start and len(path) > 1:
                    cycles.append(" -> ".join([*path, start]))
                elif nxt not in seen and nxt != start:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:20])


def test_no_module_over_800_lines():
    sizes = {path: len(path.read_text().splitlines()) for path in MODULES}
    large = {str(path.relative_to(PACKAGE.parent)): n for path, n in sizes.items() if n > 800}
    assert not large, f"modules over 800 lines: {large}"


def test_every_family_satisfies_the_contract():
    """Every registered vision-language class (text-only decoders are `HookedTransformer`)."""
    families = {cls for cls in MODEL_TYPES.values() if issubclass(cls, mmlens.HookedLlava)}
    assert len(families) >= 4
    for cls in families:
        assert isinstance(cls, VisionLanguageFamily), cls
    assert not isinstance(mmlens.HookedTransformer, VisionLanguageFamily)


def test_every_geometry_satisfies_the_contract(tiny_next_checkpoint):
    model = mmlens.load("tiny-shapes")
    from mmlens.testing import make_test_image

    inp = model.prepare(make_test_image(60, 40), "What is it?")
    assert isinstance(inp.image_geometry[0], ImageTokenGeometry)
    next_model = mmlens.from_pretrained(tiny_next_checkpoint())
    tiled = next_model.prepare(make_test_image(60, 40), "What is it?").image_geometry[0]
    assert isinstance(tiled, ImageTokenGeometry) and isinstance(tiled.tile_grid, TileGrid)
