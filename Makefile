# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test check lint typecheck pytest bench images clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[worker,operator,dev]'
	touch $(STAMP)

setup: $(STAMP)
	@scripts/install-system-deps.sh

## The main job: a whole cascade on this machine, load replay, report.
demo: setup
	$(BIN)/diffcascade demo

## Lint, type-check and run every test.
test: setup check pytest

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

## Benchmarks (speed targets live here, not in tests); results land in bench/results/.
bench: setup
	$(BIN)/python bench/allocator_solve.py
	$(BIN)/python bench/sim_compare.py
	$(BIN)/python -m bench.worker_overhead
	$(BIN)/python -m bench.operator_tick
	$(BIN)/python -m bench.operator_reaction
	$(BIN)/python bench/router_auc.py
	$(BIN)/python bench/sd15_unet_cpu.py
	$(BIN)/python bench/gpu_real_architectures.py --smoke --out bench/results/tmp/gpu-smoke

## The operator and worker images, tagged with the package version, pushed to REGISTRY:
##   make images REGISTRY=ghcr.io/you   (PUSH=0: build only; DRY_RUN=1: print the commands)
images:
	@scripts/build-images.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
