# Two commands for a fresh machine: `make run` (local pipeline) and `make test` (test suite).
# Both create .venv and install the pinned CPU requirements on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl

.PHONY: setup run test test-all clean bench

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@$(PY) -c "import torch, libero, common; print('setup ok: torch', torch.__version__)"
	touch $(STAMP)

setup: $(STAMP)

# Local pipeline (CPU): demos -> Phase 1 -> Phase 2 -> Phase 3 -> report/REPORT.md.
# `make run QUICK=1` runs the ~10-minute profile. Reruns reuse unchanged stages.
PROFILE := $(if $(QUICK),quick,default)
run: setup
	$(PY) -m rsd_pipeline run --profile $(PROFILE)

# Default suite: everything not marked slow (a few minutes on 2 cores).
test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

# Removes generated artifacts (demos, checkpoints, pipeline results). Committed results/ and report/ stay.
clean:
	rm -rf artifacts .pytest_cache

# Benchmarks (write JSON + markdown to results/). vector-quantize-pytorch is benchmark-only.
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(PY) -m benchmarks.bench_tokenizers
