# Thin wrappers over the `fsar` command line. Every target installs what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FSAR := $(VENV)/bin/fsar
STAMP := $(VENV)/.fsar-installed

# extraction knobs (see README "make extract")
DATASET ?= demo
MODEL ?= RN50
ROOT ?= data/$(DATASET)
OUT ?= stores/$(DATASET)_$(MODEL).zarr
PRETRAINED ?=
WEIGHTS ?=
CHECKPOINT ?=
EXTRA ?=
NPROC ?= 1
PYTEST_ARGS ?=

WEIGHT_FLAGS := $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

.PHONY: install test lint format extract demo bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check fsar tests benchmarks
	$(VENV)/bin/ruff check fsar tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format fsar tests benchmarks
	$(VENV)/bin/ruff check --fix fsar tests benchmarks

extract: $(STAMP)
ifeq ($(NPROC),1)
	$(FSAR) extract --dataset $(DATASET) --root $(ROOT) --model $(MODEL) $(WEIGHT_FLAGS) --out $(OUT) $(EXTRA)
else
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m fsar extract --dataset $(DATASET) --root $(ROOT) --model $(MODEL) $(WEIGHT_FLAGS) --out $(OUT) $(EXTRA)
endif

demo: $(STAMP)
	$(FSAR) demo --workdir outputs/demo

bench: $(STAMP)
	$(PY) benchmarks/extract.py --out benchmarks/results/extract.json
	$(PY) benchmarks/heads.py --out benchmarks/results/heads.json

clean:
	rm -rf outputs stores .pytest_cache
