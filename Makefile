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

# The main job: the whole pipeline on Gemma 3 270M (packaged offline, dequantized once into
# the mlake cache) into runs/pipeline/gemma-3-270m-4facts (report.md, figures/), with the
# settings of mlake/pipeline/demo_gemma.yaml.  `mlake pipeline` alone runs the defaults on
# mlake-tiny.  One thread: see the README.
demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/mlake pipeline --config mlake/pipeline/demo_gemma.yaml

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
