# Quick start: `make demo` (install + CPU demo), `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	# The CPU build of torch first, so pip does not pull a multi-GB CUDA build; GPU users install their own.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"

demo: install
	$(BIN)/python train.py experiment=demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/tokenization.py

clean:
	rm -rf outputs multirun .pytest_cache
