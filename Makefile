# Every target creates or refreshes .venv itself (torch==2.13.0 is pinned here: a bare
# `torch` requirement with nothing installed would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaptive-pp-installed
TORCH ?= torch==2.13.0

.PHONY: venv demo test lint typecheck unit bench experiments experiments-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev,otel,plot,notebook,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaptive-pp demo

lint: $(STAMP)
	$(BIN)/ruff check adaptive_pp controllers tests experiments
	$(BIN)/ruff format --check adaptive_pp controllers tests experiments

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not multiprocess and not collector"

# Two pytest workers: the tests that spawn stage processes run one after another on one of
# them (tests/conftest.py's scheduler), the pure-Python tests on the other.
test: lint typecheck
	$(BIN)/python -m pytest -n 2

bench: $(STAMP)
	$(BIN)/python -m experiments.bench_simulator

experiments: $(STAMP)
	$(BIN)/python -m experiments.run_all --figures docs/figures

experiments-quick: $(STAMP)
	$(BIN)/python -m experiments.run_all --quick

.PHONY: gpu-check
gpu-check: $(STAMP)  # what this machine has of the GPU paths -> results/gpu_check/gpu_check.json
	$(BIN)/python -m experiments.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
