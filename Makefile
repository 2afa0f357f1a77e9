# ShareLoRA for Axolotl — everything a user or CI runs. `make setup` is idempotent (seconds when done).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export AXOLOTL_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

INSTALLED := $(VENV)/.sharelora-installed
ASSETS := .cache/models/SmolLM2-135M-Instruct/.prepared .cache/data/.prepared

.PHONY: setup demo test test-fast lint format reproduce quality llava-demo clean

setup: $(INSTALLED) assets

$(INSTALLED): configs/requirements-lock.txt configs/constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, the CPU build on disk; the constraint keeps every later install from replacing it
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -c configs/constraints.txt -r configs/requirements-lock.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	@touch $@

assets: $(INSTALLED)
	$(PY) -m bench.embedded

demo: setup
	accelerate launch -m axolotl.cli.train recipes/smollm2_sharelora.yml
	$(PY) -m sharelora_plugin.cli show outputs/smollm2_sharelora/sharelora_plan.json

# Tiny LLaVA (SmolLM2 + random CLIP tower + random projector): visual-text calibration, plan, tie, 8 steps, answers
llava-demo: setup
	$(PY) llava/build_tiny.py
	rm -rf outputs/tiny_llava_sharelora
	accelerate launch -m axolotl.cli.train recipes/tiny_llava_sharelora.yml
	$(PY) -m sharelora_plugin.cli show outputs/tiny_llava_sharelora/sharelora_plan.json
	$(PY) llava/answer.py --model-base .cache/tiny_llava/model --adapter outputs/tiny_llava_sharelora \
		--question-file .cache/tiny_llava/bench/questions.jsonl --image-folder .cache/tiny_llava/bench/images \
		--answers-file outputs/tiny_llava_sharelora/llava_bench_answers.jsonl --max-new-tokens 24 --batch-size 4

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not e2e"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# Small-scale ShareLoRA reproduction on the embedded SmolLM2 (~50 min on 2 free CPU cores); results land in
# bench/results/reproduce_small.{json,md,png}. `make reproduce REPRODUCE_ARGS=--quick` checks the pipeline in ~4 min
# (its report goes to outputs/reproduce_small/quick/).
reproduce: setup
	$(PY) -m bench.reproduce_small $(REPRODUCE_ARGS)

# Does sharing keep quality? Paired LoRA vs ShareLoRA arms on rated movie reviews and held-out word analogies
# (~90 min on 2 free CPU cores, resumable); results land in bench/results/quality.{json,md,png}.
# `make quality QUALITY_ARGS=--quick` checks the pipeline in ~1 min (report in outputs/quality/quick/);
# `QUALITY_ARGS="--task my_task.jsonl"` runs the same protocol on your own data.
quality: setup
	$(PY) -m bench.quality $(QUALITY_ARGS)

clean:
	rm -rf outputs last_run_prepared .pytest_cache
