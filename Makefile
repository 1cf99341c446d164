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

# Local pipeline (CPU). Phase 1 on synthetic actions: naive + robust tokenizers, then the comparison.
run: setup
	$(PY) -m phase1_improved.train_rfsq_robust --no-use-layernorm --num-episodes 50 --epochs 100 --batch-size 64
	$(PY) -m phase1_improved.train_rfsq_robust --use-layernorm --num-episodes 50 --epochs 100 --batch-size 64
	$(PY) -m phase1_improved.test_layernorm_improvement

# Default suite: everything not marked slow (a few minutes on 2 cores).
test: setup
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m pytest -q

clean:
	rm -rf artifacts .pytest_cache

# Benchmarks (write JSON + markdown to results/). vector-quantize-pytorch is benchmark-only.
bench: setup
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-bench.txt
	$(PY) -m benchmarks.bench_tokenizers
