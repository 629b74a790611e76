# Two commands set up everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LLAMA_CPP := $(VENV)/share/llama.cpp
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# The one command `make demo` ends with; tests/test_readme.py runs it as the README shows it.
DEMO_CHAT := .venv/bin/qlora-kit export runs/demo --types q8_0 --force && .venv/bin/python -m qlora_kit.export.chat runs/demo/gguf/demo-q8_0.gguf "What is 4 plus 18?"

.PHONY: setup demo test test-fast lint format constraints demo-model clean bench-gpu bench-gpu-dry

setup: $(STAMP)

# torch is installed on its own first: `torch==2.13.0` takes the local CPU wheel on machines without a GPU
# (pip's find-links) and the ordinary CUDA build on a GPU machine; everything else is pinned by constraints.txt.
# llama-cpp-python compiles llama.cpp the first time (about 11 minutes on 2 busy cores); pip keeps the built wheel in
# its cache, so later setups, fresh clones included, install it in seconds. llama.cpp's converter scripts come from
# the same source archive (qlora_kit/export/install.py).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[metrics,lm-eval,gguf,tracking,deepspeed,dev]"
	$(PY) -m qlora_kit.export.install $(LLAMA_CPP)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qlora-kit train recipes/demo.yaml --output-dir runs/demo --force
	@echo "Export the demo run to GGUF (verified by llama.cpp) and chat with it in llama.cpp:"
	@echo '  $(DEMO_CHAT)'

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

# The GPU suite (docs/benchmarking.md): qlora-kit beside plain trl on the Llama-3.1-8B shape, the long-context ladder,
# a verified merge, qlora-kit beside LLaMA-Factory, axolotl and trl on the demo job (benchmarks/peers.py), and a
# dated section of benchmarks/RESULTS.md with the targets' pass/fail. One NVIDIA GPU.
bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_suite.py

# The same stages on CPU with a tiny shape (a minute or two); the section goes to benchmarks/out/RESULTS-dry-run.md.
bench-gpu-dry: $(STAMP)
	$(PY) benchmarks/gpu_suite.py --dry-run

# Rebuild the committed demo model and task data (deterministic; a few minutes on CPU).
demo-model: $(STAMP)
	$(PY) -m qlora_kit.demo_model --output models/demo-base --data-dir data/demo

constraints: $(STAMP)
	$(PY) -m pip freeze --exclude-editable | grep -v '^qlora-kit' > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
