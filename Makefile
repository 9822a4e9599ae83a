# normlab: every target bootstraps .venv first (torch==2.13.0 before anything else, so pip never pulls a CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup run test browser bench lab lab-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@# The presets' compiled training steps, so that runs of any length start compiled (CI skips it: the tests
	@# compile what they need into a cache of their own, and a CI machine never trains the presets).
	@if [ -z "$$CI" ]; then echo "compiling the presets' training steps (once, a few minutes)"; \
	  $(VENV)/bin/normlab compile || echo "note: compiling failed; normlab trains uncompiled"; fi
	touch $(STAMP)

# The main job: train the default preset on the bundled names, calibrate BatchNorm, sample, write the report.
STAMP_NOW := $(shell date +%Y%m%d-%H%M%S)
RUN ?= runs/main-$(STAMP_NOW)
run: setup
	$(VENV)/bin/normlab train --preset lesson-batchnorm --calibrate --diagnose --out $(RUN)
	$(VENV)/bin/normlab sample $(RUN) -n 20

test: setup browser
	$(PY) -m pytest

# Debian's chromium, for the test that opens report.html in a real browser (skipped, with the reason, without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; } || \
	  echo "note: chromium could not be installed; the browser test of report.html will be skipped"

# Benchmarks print their tables and one JSON line each; ANCHOR is the lesson's names file (never in the repo).
ANCHOR ?= ../shared/anchors/names.txt
bench: setup
	$(PY) benchmarks/speed.py --data $(ANCHOR)
	$(PY) benchmarks/diagnostics_overhead.py
	$(PY) benchmarks/lesson_losses.py --data $(ANCHOR)

# Every claim of the lesson, measured: `make lab` (full, under an hour) or `make lab-quick` (under ten minutes).
lab: setup
	$(VENV)/bin/normlab lab run all --force
lab-quick: setup
	$(VENV)/bin/normlab lab run all --quick --force --out lab-quick

clean:
	rm -rf $(VENV) runs lab lab-quick
