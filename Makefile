# prunepilot: `make demo` runs the full job on built-in data; `make test` runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

ZOO := .venv-zoo
ZOO_TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-slow test-zoo lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, from the CPU build: otherwise pip resolves torch through a dependency and pulls a CUDA build
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[export]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[dev,export,ray]'
	touch $@

# torchvision and timm need the larger torch build (about 6 GB): their own venv, so that `make test` stays light
$(ZOO)/.installed:
	$(PY) -m venv $(ZOO)
	$(ZOO)/bin/python -m pip install -q --upgrade pip
	$(ZOO)/bin/python -m pip install -q --no-cache-dir $(ZOO_TORCH)
	$(ZOO)/bin/python -m pip install -q timm -e '.[dev,export]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/prunepilot demo --out runs/demo

# the fast tier; test-slow runs the rest (end-to-end CLI runs, budgets over hundreds of episodes, kill -9 resume)
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m "slow and not zoo"

# every torchvision CNN family pruned at 50% FLOPs, exactly, with its ONNX round trip
test-zoo: $(ZOO)/.installed
	$(ZOO)/bin/python -m pytest -q -m zoo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf runs/demo .pytest_cache
