# One command sets up and does the job; each target is idempotent.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-slow demo lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU wheel of torch lies on local disk; installing it first keeps pip from pulling a CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(VENV)/bin/mmlens demo

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/forward.py
	$(PY) bench/pruning.py
