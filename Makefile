# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q setuptools wheel
	# torch first, pinned: the CPU build on this machine; every other requirement accepts it.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: a sample grid from the shipped digits teacher and its metrics,
# then TinyFusion's learnable depth pruning of that teacher, 12 -> 6 layers (scheme 1:2).
demo: $(STAMP)
	$(PY) -m tinyfusion.sample --out runs/demo/grid.png
	$(PY) -m tinyfusion.evaluate --json runs/demo/metrics.json
	rm -rf runs/demo/prune
	$(PY) -m tinyfusion.prune --out runs/demo/prune

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs/demo .pytest_cache
