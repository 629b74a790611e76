# Two commands set up everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast lint format constraints demo-model clean

setup: $(STAMP)

# torch is installed on its own first: `torch==2.13.0` takes the local CPU wheel on machines without a GPU
# (pip's find-links) and the ordinary CUDA build on a GPU machine; everything else is pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[metrics,lm-eval,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qlora-kit train recipes/demo.yaml --output-dir runs/demo --force

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 tests

# The unit tests alone (no training, merging or generation): under a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check qlora_kit tests benchmarks
	$(VENV)/bin/ruff format --check qlora_kit tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format qlora_kit tests benchmarks
	$(VENV)/bin/ruff check --fix qlora_kit tests benchmarks

# Rebuild the committed demo model and task data (deterministic; a few minutes on CPU).
demo-model: $(STAMP)
	$(PY) -m qlora_kit.demo_model --output models/demo-base --data-dir data/demo

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^qlora-kit' > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
