# One-command setup: `make demo` (set up, then run the built-in demo), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of PyTorch goes in first, so that nothing pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench-fast bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,hf]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/ccamerge demo --force

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check ccamerge tests benchmarks
	$(BIN)/ruff format --check ccamerge tests benchmarks

# Benchmarks on Fashion-MNIST (docs/benchmarks.md): fast subset (< 10 min), or everything.
bench-fast: setup
	$(BIN)/python benchmarks/run_all.py --fast

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) ccamerge-demo .pytest_cache
