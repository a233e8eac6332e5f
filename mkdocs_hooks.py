"""MkDocs hooks (mkdocs.yml `hooks:`): the site renders the tutorials from notebooks/, and the
build writes nothing into the repository.

- The tutorials live in `notebooks/`, outside `docs_dir`. Each `notebooks/NN_name.ipynb` joins
  the site as the page `tutorials/NN_name.ipynb` (URL `tutorials/NN_name/`; the name mkdocs.yml's
  nav and the docs' links use), read where it lies: nothing is copied into `docs/`.
- mkdocs-jupyter caches each rendered notebook in its `cache_dir`, by default
  `.cache/mkdocs-jupyter` under the working directory (the repository root). The cache goes under
  the environment that runs mkdocs instead (`<venv>/cache/mkdocs-jupyter/<checkout hash>`, one
  folder per checkout since each build evicts the entries it did not use; a temporary folder where
  the environment is read-only); `MKDOCS_JUPYTER_CACHE_DIR` chooses another folder.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent
NOTEBOOKS = ROOT / "notebooks"


def _tutorials() -> dict[str, Path]:
    """Site path (relative to docs_dir) -> notebook."""
    return {f"tutorials/{path.name}": path for path in sorted(NOTEBOOKS.glob("*.ipynb"))}


def on_config(config):
    jupyter = config.plugins["mkdocs-jupyter"]
    jupyter.config["cache_dir"] = str(_cache_dir())
    return config


# Before mkdocs-jupyter's on_files (priority 0), which makes the notebooks pages.
@event_priority(50)
def on_files(files, config):
    for src_uri, notebook in _tutorials().items():
        files.append(File.generated(config, src_uri, abs_src_path=str(notebook)))
    return files


def on_nav(nav, config, files):
    # mkdocs-jupyter's on_files wrapped each file in a NotebookFile, which derives its source
    # path from docs_dir (None for a file that is not in it): point it at the notebook again.
    for src_uri, notebook in _tutorials().items():
        file = files.get_file_from_path(src_uri)
        file.abs_src_path = str(notebook)
        file.edit_uri = f"../notebooks/{notebook.name}"  # edit_uri is relative to docs/
    return nav


def _cache_dir() -> Path:
    if os.environ.get("MKDOCS_JUPYTER_CACHE_DIR"):
        return Path(os.environ["MKDOCS_JUPYTER_CACHE_DIR"])
    base = Path(sys.prefix) if os.access(sys.prefix, os.W_OK) else Path(tempfile.gettempdir())
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
    return base / "cache" / "mkdocs-jupyter" / checkout
