# One command sets up and does the job; each target is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python
# Exact versions the suite last passed with (`make lock` rewrites it; CONTRIBUTING.md).
LOCK := constraints.txt
# The CPU wheel of torch lies on local disk; installing it first keeps pip from pulling a CUDA
# build. The package itself only asks for a range (pyproject.toml).
TORCH ?= torch==2.13.0

.PHONY: setup test test-slow test-latest lock demo lint bench notebooks docs

$(VENV)/.installed: pyproject.toml $(LOCK)
	rm -rf $(VENV)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(LOCK) "$(TORCH)"
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[dev,docs]"
	touch $@

setup: $(VENV)/.installed

# The suite, the tutorials executed top to bottom (nbmake; it does not rewrite them), and the
# docs site built strictly. None of it writes into the tree (.ci/run checks): no pytest cache,
# bytecode under $(VENV), the site in $(VENV)/site, mkdocs-jupyter's cache under $(VENV)
# (mkdocs_hooks.py); tests, doctests and notebooks write in temporary folders.
test: export PYTHONPYCACHEPREFIX = $(abspath $(VENV))/pycache
test: setup
	$(PY) -m pytest -q -p no:cacheprovider
	$(PY) -m pytest -q -p no:cacheprovider --nbmake --nbmake-timeout=600 notebooks
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site

# Re-execute the tutorials and store their outputs (figures included) in the committed copies.
notebooks: setup
	MMLENS_PNG_FIGURES=1 $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace notebooks/*.ipynb

docs: setup
	$(VENV)/bin/mkdocs serve

test-slow: setup
	$(PY) -m pytest -q -m slow

# The newest releases the pyproject ranges allow (torch stays $(TORCH)), in a venv of its own,
# running the same suite; prints how they differ from the lock first.
test-latest:
	rm -rf .venv-latest
	python3 -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet "$(TORCH)"
	.venv-latest/bin/python -m pip install --quiet -e ".[dev,docs]"
	.venv-latest/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//' > .venv-latest/versions.txt
	grep -v '^#' $(LOCK) | diff - .venv-latest/versions.txt && echo "newest releases = the lock" || true
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider

# A fresh resolve of the pyproject ranges, written as exact versions to $(LOCK).
lock:
	rm -rf .venv-lock
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet "$(TORCH)"
	.venv-lock/bin/python -m pip install --quiet -e ".[dev,docs]"
	{ echo "# Exact versions for 'make setup' (pip -c). Written by 'make lock' on $$(date -u +%F); see CONTRIBUTING.md."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK)
	rm -rf .venv-lock

demo: setup
	$(VENV)/bin/mmlens demo

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/forward.py
	$(PY) bench/pruning.py
