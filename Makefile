# One-command entry points. Everything runs inside .venv (created on first use).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,train,serve,dev,bench
SERVE_EXTRAS ?= cpu,serve

.PHONY: setup setup-serve serve demo runner test test-fast lint bench train image image-gpu lock clean

# Two install levels in one venv: serving only (ONNX Runtime, BentoML: no torch, no test tools), or
# everything (training, tests). Each stamp is remade when pyproject.toml changes.
$(VENV)/.installed-serve: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(SERVE_EXTRAS)]"
	touch $@

$(VENV)/.installed-all: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@ $(VENV)/.installed-serve

setup-serve: $(VENV)/.installed-serve

setup: $(VENV)/.installed-all

serve: setup-serve            ## the service on http://127.0.0.1:3000 with a demo slide in data/slides
	$(BIN)/uga serve --demo-slide

demo: setup-serve             ## build the demo slide (once) and segment it (CLI only)
	$(BIN)/uga demo

runner: setup                 ## the fine-tune runner next to `make serve` (needs torch: the full install)
	$(BIN)/uga runner

test: setup                   ## the whole test suite (what CI runs)
	$(BIN)/ruff check service models tests bench image
	$(BIN)/python -m pytest -q

test-fast: setup              ## everything but the e2e and slow tests (no server or runner processes), 2 processes, < 2 min
	$(BIN)/ruff check service models tests bench image
	$(BIN)/python -m pytest -q -m "not e2e and not slow" -n 2 --dist loadfile

bench: setup                  ## engine benchmark (prints a table)
	$(BIN)/python bench/bench_engine.py

train: setup                  ## retrain the shipped baseline (all stages; fit uses CUDA when present)
	$(BIN)/python -m models.train

image: setup-serve            ## OCI images with podman, offline: localhost/uga-serve:VERSION, localhost/uga-runner:VERSION
	PY=$(BIN)/python image/build.sh serve runner

image-gpu: setup-serve        ## the GPU serving image (onnxruntime-gpu): localhost/uga-serve-gpu:VERSION
	PY=$(BIN)/python image/build.sh gpu

lock: setup-serve             ## rewrite image/locks/ (each image's wheels by version and sha256) after a dependency changed
	$(BIN)/python image/lock.py serve runner gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
