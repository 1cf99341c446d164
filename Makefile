# Two commands for a fresh machine: `make run` (local pipeline) and `make test` (test suite).
# Both create .venv and install the pinned CPU requirements on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MUJOCO_GL ?= egl

.PHONY: setup run test test-all clean bench evidence

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
	$(PY) -m benchmarks.tokenizer.bench_tokenizers

# The larger runs behind the docs' results sections (hours of CPU; each step resumes/reuses):
# demos for libero_object + libero_spatial, Phase 1 at the seed's settings and on all demos,
# Phase 2 on robust and naive tokens, Phase 3 comparisons, then the docs regenerated.
DEMOS := data/libero_object_demos.hdf5,data/libero_spatial_demos.hdf5
SEED50 := artifacts/models_seed50
PHASE2_FLAGS := --data $(DEMOS) --num-episodes 0 --epochs 12 --batch-size 256 --lr 1e-3 --d-model 128 --num-blocks 2
# the Phase 3 drafts: retrained on the frozen heads, chained, wider, distilled on perturbed states too
DRAFT_FLAGS := --data $(DEMOS) --num-episodes 0 --epochs 30 --batch-size 256 --lr 1e-3 --d-model 128 --num-blocks 2 \
	--train draft --draft-mode chained --draft-width 512 --draft-hidden-layers 3 --draft-augment-copies 2 --draft-augment-noise 0.1
# robust-B (naive-token models + robust decoder) fails at 10 trials per task; it gets 10, the others 50
PHASE3_FLAGS := --num-trials 50 --variant-trials robust-B=10
evidence: setup
	$(PY) -m phase1_improved.collect_demos --suite libero_object --tasks 0-9 --demos-per-task 30 --workers 2 --out libero_object_demos.hdf5
	$(PY) -m phase1_improved.collect_demos --suite libero_spatial --tasks 0-3,5-9 --demos-per-task 30 --workers 2 --out libero_spatial_demos.hdf5
	$(PY) -m phase1_improved.train_rfsq_robust --no-use-layernorm --data $(DEMOS) --num-episodes 50 --epochs 100 --batch-size 64 --models-dir $(SEED50)
	$(PY) -m phase1_improved.train_rfsq_robust --use-layernorm --data $(DEMOS) --num-episodes 50 --epochs 100 --batch-size 64 --models-dir $(SEED50)
	$(PY) -m phase1_improved.test_layernorm_improvement --naive $(SEED50)/rfsq_best.pt --robust $(SEED50)/rfsq_robust_best.pt --out results/phase1_real
	$(PY) -m phase1_improved.train_rfsq_robust --no-use-layernorm --data $(DEMOS) --num-episodes 1000 --epochs 40 --batch-size 256
	$(PY) -m phase1_improved.train_rfsq_robust --use-layernorm --data $(DEMOS) --num-episodes 1000 --epochs 40 --batch-size 256
	$(PY) -m phase1_improved.test_layernorm_improvement --out results/phase1_real_all
	$(PY) -m phase2_draft_retrain.modal_train_draft_with_projection $(PHASE2_FLAGS)
	$(PY) -m phase2_draft_retrain.modal_train_draft_with_projection $(PHASE2_FLAGS) --rfsq-checkpoint artifacts/models/rfsq_best.pt
	$(PY) -m phase2_draft_retrain.modal_train_draft_with_projection $(DRAFT_FLAGS) --overwrite
	$(PY) -m phase2_draft_retrain.modal_train_draft_with_projection $(DRAFT_FLAGS) --rfsq-checkpoint artifacts/models/rfsq_best.pt --overwrite
	$(PY) -m phase3.compare --task-suite libero_object --tasks 0-9 $(PHASE3_FLAGS)
	$(PY) -m phase3.compare --task-suite libero_spatial --tasks 0-3,5-9 $(PHASE3_FLAGS)
	$(PY) -m rsd_pipeline report
