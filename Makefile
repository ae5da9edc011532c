# Two commands do everything on a fresh machine:
#   make run    the main job: pyebm info, then pyebm demo (train a small energy, batched descent, latency)
#   make test   the test suite (installs triton and the test extra so the Triton kernels are tested)
# Both create or reuse the virtual environment .venv, put torch==2.13.0 in first when no torch is
# present (a plain `torch` requirement would pull a several-GB CUDA build), then install pyebm with
# --no-build-isolation so the extension builds against that torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: venv install install-test run test bench cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@$(PY) -c "import numpy, pybind11" 2>/dev/null || $(PIP) install -q numpy pybind11 setuptools wheel

# -v: pip hides a build's output otherwise; with it CMake's and Ninja's [done/total] lines show progress.
install: venv
	@echo "make: building the C++ extension pyebm._C (CMake + Ninja, a few minutes on 2 cores)"
	$(PIP) install -v --no-build-isolation -e .

install-test: venv
	$(PIP) install -q "triton>=3.0" "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" "rich>=13" "matplotlib>=3.6"
	@echo "make: building the C++ extension pyebm._C (CMake + Ninja, a few minutes on 2 cores)"
	$(PIP) install -v --no-build-isolation -e ".[test]"

run: install
	@$(PIP) install -q "rich>=13" "matplotlib>=3.6"
	@echo "make run: pyebm info (version, build, usable backends), then pyebm demo (trains a small energy model,"
	@echo "          runs batched multi-candidate descent on it, times the fused path against the eager loop,"
	@echo "          writes pyebm_demo.png). The op benchmark is 'make bench' or '.venv/bin/pyebm bench ops --quick'."
	$(VENV)/bin/pyebm info
	$(VENV)/bin/pyebm demo

test: install-test
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: install-test
	$(PY) bench/bench_mlp_energy.py

# nvcc on every csrc/cuda/*.cu (no GPU needed): proves the CUDA sources compile.
cuda-check: venv
	$(PY) tools/cuda_check.py

clean:
	rm -rf build *.egg-info pyebm/_C*.so
