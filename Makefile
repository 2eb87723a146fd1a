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

# head knobs (see README "Training and evaluating heads")
METHOD ?= clipspm
SHOT ?= 5
PRESET ?=
EXPERIMENT ?= configs/experiments/$(METHOD)/$(DATASET)_$(MODEL)_$(SHOT)shot.yaml
STORE ?= $(OUT)
RUN ?= outputs/runs/$(DATASET)_$(MODEL)_$(METHOD)_$(SHOT)shot
GRID ?= --grid head.hsmr=true,false --grid head.padm=true,false
ABLATION ?= outputs/ablations/$(DATASET)_$(MODEL)_$(METHOD)_$(SHOT)shot
# runs of ablate / sweep (see README "fsar ablate" and "fsar sweep")
SWEEP ?= configs/sweeps/paper_tables.yaml
JOBS ?= 1
SHARD ?=
SEEDS ?=
THREADS ?=
FT_RUN ?= outputs/finetune/$(DATASET)_$(MODEL)_$(METHOD)_$(SHOT)shot
RESULTS ?= outputs/runs
REPORT ?= outputs/report

EXP_CONFIG = $(if $(PRESET),--config configs/presets/$(PRESET).yaml) $(if $(wildcard $(EXPERIMENT)),--config $(EXPERIMENT))
RUN_FLAGS = --jobs $(JOBS) $(if $(SHARD),--shard $(SHARD)) $(if $(SEEDS),--seeds $(SEEDS)) $(if $(THREADS),--threads $(THREADS))
WEIGHT_FLAGS := $(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT))

.PHONY: install test lint format extract train-heads finetune-e2e eval ablate sweep report demo bench clean

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
	$(VENV)/bin/ruff format --check fsar tests benchmarks configs
	$(VENV)/bin/ruff check fsar tests benchmarks configs

format: $(STAMP)
	$(VENV)/bin/ruff format fsar tests benchmarks configs
	$(VENV)/bin/ruff check --fix fsar tests benchmarks configs

extract: $(STAMP)
ifeq ($(NPROC),1)
	$(FSAR) extract --dataset $(DATASET) --root $(ROOT) --model $(MODEL) $(WEIGHT_FLAGS) $(if $(PRESET),--config configs/presets/$(PRESET).yaml) --out $(OUT) $(EXTRA)
else
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m fsar extract --dataset $(DATASET) --root $(ROOT) --model $(MODEL) $(WEIGHT_FLAGS) $(if $(PRESET),--config configs/presets/$(PRESET).yaml) --out $(OUT) $(EXTRA)
endif

train-heads: $(STAMP)
	$(FSAR) train --dataset $(DATASET) --model $(MODEL) $(EXP_CONFIG) --store $(STORE) --out $(RUN) $(EXTRA)

# end-to-end fine-tuning (see README "fsar finetune"); NPROC>1 runs DDP under torchrun
FT_ARGS = --dataset $(DATASET) --root $(ROOT) --model $(MODEL) --head $(METHOD) --shot $(SHOT) $(WEIGHT_FLAGS) $(EXP_CONFIG) --out $(FT_RUN) $(EXTRA)
finetune-e2e: $(STAMP)
ifeq ($(NPROC),1)
	$(FSAR) finetune $(FT_ARGS)
else
	$(VENV)/bin/torchrun --nproc_per_node=$(NPROC) -m fsar finetune $(FT_ARGS)
endif

eval: $(STAMP)
	$(FSAR) eval --dataset $(DATASET) --model $(MODEL) $(EXP_CONFIG) --checkpoint $(RUN)/best.pt --store $(STORE) $(EXTRA)

ablate: $(STAMP)
	$(FSAR) ablate --dataset $(DATASET) --model $(MODEL) $(EXP_CONFIG) --store $(STORE) --out $(ABLATION) $(GRID) $(RUN_FLAGS) $(EXTRA)

sweep: $(STAMP)
	$(FSAR) sweep $(SWEEP) $(RUN_FLAGS) $(EXTRA)

report: $(STAMP)
	$(FSAR) report $(RESULTS) --out $(REPORT) --runs $(wildcard $(RESULTS)/*/)

demo: $(STAMP)
	$(FSAR) demo --workdir outputs/demo

bench: $(STAMP)
	$(PY) benchmarks/extract.py --out benchmarks/results/extract.json
	$(PY) benchmarks/heads.py --out benchmarks/results/heads.json
	$(PY) benchmarks/compile.py --out benchmarks/results/compile.json
	$(PY) benchmarks/pipeline.py --out benchmarks/results/pipeline.json
	$(PY) benchmarks/pipeline.py --widths vitb16 --out benchmarks/results/pipeline_vitb16_widths.json
	$(PY) benchmarks/pipeline.py --head clipfsar --set head.dim_head=8 --fsar-episodes 4096 \
		--out benchmarks/results/pipeline_clipfsar.json
	$(PY) benchmarks/finetune.py --out benchmarks/results/finetune.json
	$(PY) benchmarks/store_checks.py --out benchmarks/results/store_checks.json
	$(PY) benchmarks/release_frames.py --out benchmarks/results/release_frames.json
	$(PY) benchmarks/ablate_jobs.py --out benchmarks/results/ablate_jobs.json
	$(PY) benchmarks/ablate_jobs.py --heads-only --out benchmarks/results/threads_per_head.json

clean:
	rm -rf outputs stores .pytest_cache
