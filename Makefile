# Two commands on a fresh machine: `make run` (the default job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint tiny

$(BIN)/rltune:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so the rest does not pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install -q -e '.[dev]'

install: $(BIN)/rltune

run: install
	$(BIN)/rltune

test: install
	# two workers, one thread each: the tests are many small CPU-bound runs
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/pytest -q -n 2 --durations=10

lint: install
	$(BIN)/ruff check rltune tests scripts
	$(BIN)/ruff format --check rltune tests scripts

tiny: install
	$(BIN)/python scripts/make_tiny_model.py
