# Set-up, main job and tests. Everything the project needs is installed from here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Versions pinned for development and CI only; pyproject.toml declares loose ranges.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench gpu-check data clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[dev,data,analysis]'
	touch $@

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
