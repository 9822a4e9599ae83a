# normlab: every target bootstraps .venv first (torch==2.13.0 before anything else, so pip never pulls a CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup run test bench lab clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: setup
	$(PY) -m normlab.cli demo

test: setup
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs
