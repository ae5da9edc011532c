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

.PHONY: venv install install-test run test test-isa bench cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	@$(PY) -c "import numpy, pybind11" 2>/dev/null || $(PIP) install -q numpy pybind11 setuptools wheel

install: venv
	$(PIP) install -q --no-build-isolation -e .

install-test: venv
	$(PIP) install -q "triton>=3.0" "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" "rich>=13" "matplotlib>=3.6"
	$(PIP) install -q --no-build-isolation -e ".[test]"

run: install
	@$(PIP) install -q "rich>=13" "matplotlib>=3.6"
	$(VENV)/bin/pyebm info
	$(VENV)/bin/pyebm demo

test: install-test
	$(PY) -m pytest -q tests $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory test-isa

# The CPU kernel tests again under each instruction set this CPU runs below its widest (PYEBM_CPU_ISA; torch's
# and MKL's own dispatch lowered to match), so an AVX-512 machine also proves the AVX2 and baseline paths.
ISA_TESTS ?= tests/test_mlp_energy.py tests/test_mlp_descent.py tests/test_descent.py tests/test_ebt_policy.py \
	tests/test_mlp_plan.py tests/test_op_boundary.py tests/test_cpu_isa.py
test-isa:
	@for isa in $$($(PY) -c "import pyebm; from pyebm import _C; print(' '.join(_C.cpu_isa()['supported'][1:]))" 2>/dev/null); do \
	  case $$isa in avx2) aten=avx2; mkl=AVX2;; *) aten=default; mkl=SSE4_2;; esac; \
	  echo "== CPU kernel tests with PYEBM_CPU_ISA=$$isa"; \
	  PYEBM_CPU_ISA=$$isa ATEN_CPU_CAPABILITY=$$aten MKL_ENABLE_INSTRUCTIONS=$$mkl \
	    $(PY) -m pytest -q -k "not demo" $(ISA_TESTS) $(PYTEST_ARGS) || exit 1; \
	done

bench: install-test
	$(PY) bench/bench_mlp_energy.py

# nvcc on every csrc/cuda/*.cu (no GPU needed): proves the CUDA sources compile.
cuda-check: venv
	$(PY) tools/cuda_check.py

clean:
	rm -rf build *.egg-info pyebm/_C*.so
