# Every target sets up what it needs in a local virtual environment (.venv) and then runs.
# TORCH_SPEC chooses the torch requirement: torch==2.13.0 where no GPU is visible (a CPU build
# where pip finds one locally, as on the CI machines; elsewhere set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu), torch>=2.4 where nvidia-smi is found.
# Override it: make test TORCH_SPEC='torch==2.9.1'.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup demo ablation test bench lint clean gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp file: re-install when the package metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python -m fastkd.distill

ablation: setup
	$(BIN)/python -m fastkd.distill --ablation

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(BIN)/python -m pytest benchmarks/test_bench_cpu.py --benchmark-only $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check fastkd kernels benchmarks tests

# Wheels that a lent GPU machine (torch and triton installed, no network) lacks: the peer
# library of the benchmark, the trainer's datasets, and a setuptools that reads the SPDX
# license of pyproject.toml (>= 77). Used by benchmarks/gpu_session.sh.
GPU_WHEELS ?= liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
	setuptools==80.9.0
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
