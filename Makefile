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
# TinyFusion's learnable depth pruning of that teacher (12 -> 6 layers, scheme 1:2), a short Masked-KD
# recovery with its evaluation, and the teacher-versus-pruned table.
demo: $(STAMP)
	$(PY) -m tinyfusion.sample --out runs/demo/grid.png
	$(PY) -m tinyfusion.evaluate --json runs/demo/metrics.json
	rm -rf runs/demo/prune runs/demo/recover  # a rerun starts these two runs afresh (a run folder holding another run is refused)
	$(PY) -m tinyfusion.prune --out runs/demo/prune
	$(PY) -m tinyfusion.finetune --ckpt runs/demo/prune/pruned.safetensors --kd masked --steps 500 --out runs/demo/recover
	$(PY) -m tinyfusion.compare teacher=runs/demo/metrics.json pruned+KD500=runs/demo/recover/metrics.json

test: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf runs/demo .pytest_cache
