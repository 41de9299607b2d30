# mlake: set-up and the two entry points of the README.
# `make demo` and `make test` each create .venv if it is missing and install the pinned,
# CPU-appropriate versions first.  GPU users: see "Installing for a GPU" in the README.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for the torch install, e.g. a CUDA wheel index (see README).
TORCH_PIP_ARGS ?=
CONSTRAINTS := requirements/constraints-cpu.txt

.PHONY: setup demo notebooks test lint typecheck unit clean-venv

$(BIN)/.mlake-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

setup: $(BIN)/.mlake-installed

# The main job: the whole pipeline on mlake-tiny (trained first if not cached) into
# runs/pipeline/mlake-tiny-12facts (report.md, figures/).  One thread: see the README.
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/mlake pipeline

# Execute every notebook on mlake-tiny with a small subset (outputs are not saved).
notebooks: setup
	MLAKE_NB_FACTS=$${MLAKE_NB_FACTS:-5} OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MPLBACKEND=Agg \
		$(BIN)/jupyter execute notebooks/*.ipynb

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest

test: lint typecheck unit

clean-venv:
	rm -rf $(VENV)
