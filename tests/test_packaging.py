"""The package declares what it imports, and the lock pins what the package declares."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared(extra: str | None = None) -> set[str]:
    """Distribution names in mmlens' metadata: the dependencies, or those of one extra."""
    names = set()
    for requirement in requires("mmlens") or []:
        name, _, marker = requirement.partition(";")
        in_extra = f'extra == "{extra}"' in marker if extra else "extra ==" not in marker
        if in_extra:
            names.add(_canonical(re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0]))
    return names


def _third_party_imports(folders: list[str]) -> set[str]:
    """Top-level modules imported anywhere under `folders` (function-level imports included)."""
    modules = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    local = {"mmlens", "timing", "train"} | {path.stem for path in (ROOT / "tests").glob("*.py")}
    return modules - set(sys.stdlib_module_names) - local


def _distributions(module: str) -> set[str]:
    return {_canonical(name) for name in packages_distributions().get(module, [])}


def test_every_package_the_code_imports_is_declared():
    declared = _declared()
    undeclared = {
        module: sorted(_distributions(module))
        for module in _third_party_imports(["mmlens", "bench", "train"])
        if not _distributions(module) & declared
    }
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"


def test_tests_import_only_declared_packages():
    declared = _declared() | _declared("dev")
    undeclared = [
        module
        for module in _third_party_imports(["tests"])
        if not _distributions(module) & declared
    ]
    assert not undeclared, f"tests import packages missing from the dev extra: {undeclared}"


def test_the_lock_pins_every_declared_package_and_torch():
    pinned = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt line {line!r} is not an exact pin"
            pinned[_canonical(name)] = version
    missing = (_declared() | _declared("dev")) - set(pinned)
    assert not missing, f"run `make lock`: constraints.txt lacks {sorted(missing)}"
    assert pinned["torch"] == "2.13.0", "the Makefile installs the local CPU wheel torch==2.13.0"
