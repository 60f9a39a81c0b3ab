# Drive-KD: offline teacher-attention caches + streaming student trainer.
# `make help` lists the targets. Variables can be overridden: make cache TEACHER=InternVL3-38B WORKERS=2
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA we pin the CPU build; override with TORCH_SPEC="torch==2.6.0" etc.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

MODEL_DIR ?= models
DATA ?= data/shards
CACHES ?= caches
TEACHER ?= $(MODEL_DIR)/demo-teacher
STUDENT ?= $(MODEL_DIR)/demo-student
RUN ?= runs/drive-kd
SAMPLES ?= 240
PYTEST_ARGS ?=
export MODEL_DIR

WORKERS ?= 1
GPUS_PER_WORKER ?= 1
CACHE_ARGS ?=
TEACHER_NAME = $(notdir $(patsubst %/,%,$(TEACHER)))

.PHONY: help venv test demo-data cache bench-cache clean-venv

help: ## list the targets and their variables
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "Variables: MODEL_DIR=$(MODEL_DIR) DATA=$(DATA) CACHES=$(CACHES) TEACHER=$(TEACHER) STUDENT=$(STUDENT) RUN=$(RUN) TORCH_SPEC='$(TORCH_SPEC)'"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

venv: $(VENV)/.installed ## create .venv and install the project with test extras (idempotent)

test: venv ## run the whole test suite (unit + integration on tiny models, CPU)
	$(PY) -m pytest $(PYTEST_ARGS)

demo-data: venv ## generate the driving QA set (data/demo) and ingest it to WebDataset shards (data/shards)
	$(PY) -m pipeline.demo_data --out data/demo --samples $(SAMPLES)
	$(PY) -m pipeline.ingest --qa data/demo/qa.json --image-root data/demo --out $(DATA)

cache: venv ## cache TEACHER's attention over DATA into CACHES/<teacher name> (Ray; WORKERS, GPUS_PER_WORKER, CACHE_ARGS)
	$(PY) -m cache_teacher --teacher $(TEACHER) --data $(DATA) --out $(CACHES)/$(TEACHER_NAME) \
		--workers $(WORKERS) --gpus-per-worker $(GPUS_PER_WORKER) $(CACHE_ARGS)

bench-cache: venv ## benchmark capture vs eager attention and cache bytes per codec (benchmarks/results/)
	$(PY) -m cache_teacher.bench $(BENCH_ARGS)

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)
