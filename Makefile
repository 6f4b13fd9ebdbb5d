# Set-up, main job and tests. Everything the project needs is installed from here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Versions pinned for development and CI only; pyproject.toml declares loose ranges.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench gpu-check data clean

# The set-up is the one step that needs a package index: pip fetches torch, torchvision and the
# dependencies from PyPI, or from what pip is configured to use instead (PIP_INDEX_URL,
# PIP_FIND_LINKS: a local mirror or a folder of wheels). After it, `make demo` and `make test`
# need no network: the demo's data (digits) ships with scikit-learn.
$(VENV)/.installed: pyproject.toml Makefile
	@echo "setup: installing into $(VENV)/ (first time only: a few minutes, about 6 GB, from the package index)"
	$(PYTHON) -m venv $(VENV)
	@echo "setup 1/3: pip"
	$(PY) -m pip install --quiet --upgrade pip
	@echo "setup 2/3: $(TORCH_PIN) (the largest download)"
	$(PY) -m pip install --quiet $(TORCH_PIN)
	@echo "setup 3/3: largebatch (editable) with its dependencies and pytest"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@
	@echo "setup: done"

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/largebatch demo

test: setup
	$(PY) -m pytest -q

# Optional real data for `largebatch demo --dataset fashion-mnist` (Debian/Ubuntu, as root).
data:
	apt-get update && apt-get install -y dataset-fashion-mnist

bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/optimizer_step.py

# On a machine with one CUDA GPU, under 8 minutes: CUDA-only tests, step benchmark vs fused
# SGD/Adam, CUDA-graph capture, no-sync check, short fp16 training; writes gpu-check-report.md.
gpu-check: setup
	$(PY) benchmarks/gpu_check.py --out gpu-check-report.md

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
