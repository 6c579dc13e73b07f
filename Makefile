# flowray: every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel by default. GPU users: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=<your CUDA wheel index>
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
# The work folder of `make demo` and of every flowray command: $FLOWRAY_WORKDIR, else flowray-work.
WORKDIR ?= $(or $(FLOWRAY_WORKDIR),flowray-work)
PYTEST_ARGS ?=

.PHONY: help setup data demo clean-demo test test-integration test-slow test-all test-e2e bench \
        lint format \
        cluster-up cluster-down s3-up s3-down mlflow-up mlflow-down

help:
	@echo "make setup       create $(VENV), install flowray + test extras (TORCH_SPEC=$(TORCH_SPEC)), fetch Fashion-MNIST"
	@echo "make demo        prepare, train, register, score and sample on the embedded default (WORKDIR=$(WORKDIR))"
	@echo "make test        the fast tier: about 5 minutes on 2 cores (installs first when needed)"
	@echo "make test-integration  tests that start Ray or train a model (CI runs them after make test)"
	@echo "make test-slow   the long ones: chaos (kills, concurrent jobs), benchmark smoke runs"
	@echo "make test-all    every tier but the cluster's: test + test-integration + test-slow"
	@echo "make test-e2e    cluster end-to-end tests (Ray head + worker, MLflow server, S3 on loopback)"
	@echo "make bench       benchmarks side by side; results in bench-results/"
	@echo "make lint        ruff format check + lint"
	@echo "make cluster-up|cluster-down|s3-up|s3-down|mlflow-up|mlflow-down   local stack"

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/.installed data

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package; any folder with the four IDX
# files works too (FASHION_MNIST_DIR=... or `flowray prepare --source idx:<folder>`).
data:
	@if [ -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ]; then \
	  echo "Fashion-MNIST: $(FASHION_MNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null)) && \
	  echo "Fashion-MNIST installed: $(FASHION_MNIST_DIR)"; \
	else \
	  echo "Fashion-MNIST not found at $(FASHION_MNIST_DIR)."; \
	  echo "  Install it with: sudo apt-get install dataset-fashion-mnist"; \
	  echo "  or put the four *-idx*-ubyte.gz files in a folder and pass FASHION_MNIST_DIR=<folder>."; \
	fi

demo: setup
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/flowray demo --workdir $(WORKDIR)

clean-demo:
	rm -rf -- "$(WORKDIR)"

# Tiers are pytest markers (pyproject.toml): the default selection is the fast tier; a test that
# starts Ray or trains a model is marked `integration` (tests/conftest.py, by the fixtures it uses).
test: $(BIN)/.installed data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/python -m pytest $(PYTEST_ARGS)

test-integration: $(BIN)/.installed data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/python -m pytest -m "integration and not slow and not cluster" $(PYTEST_ARGS)

test-slow: $(BIN)/.installed data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/python -m pytest -m "slow and not cluster" $(PYTEST_ARGS)

test-all: $(BIN)/.installed data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/python -m pytest -m "not cluster" $(PYTEST_ARGS)

test-e2e: $(BIN)/.installed data
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/python -m pytest -m cluster tests/e2e $(PYTEST_ARGS)

bench: $(BIN)/.installed data
	$(BIN)/pip install -q -e ".[bench]"
	FASHION_MNIST_DIR=$(FASHION_MNIST_DIR) $(BIN)/flowray bench all --output bench-results $(BENCH_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

cluster-up: $(BIN)/.installed
	PATH=$(abspath $(BIN)):$$PATH bash infra/local/cluster-up.sh
cluster-down:
	PATH=$(abspath $(BIN)):$$PATH bash infra/local/cluster-down.sh
s3-up: $(BIN)/.installed
	PATH=$(abspath $(BIN)):$$PATH bash infra/local/s3-up.sh
s3-down:
	bash infra/local/s3-down.sh
mlflow-up: $(BIN)/.installed
	PATH=$(abspath $(BIN)):$$PATH bash infra/local/mlflow-up.sh
mlflow-down:
	bash infra/local/mlflow-down.sh
