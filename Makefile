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

.PHONY: venv install install-test run test test-isa bench cuda-check gpu-rehearsal clean

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
	$(PIP) install -q "triton>=3.0" "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" "rich>=13" "matplotlib>=3.6" "scipy>=1.9" "safetensors>=0.4" "ray[serve]>=2.10"
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
	@$(MAKE) --no-print-directory test-isa

# The CPU kernel tests again under each instruction set this CPU runs below its widest (PYEBM_CPU_ISA; torch's
# and MKL's own dispatch lowered to match), so an AVX-512 machine also proves the AVX2 and baseline paths.
ISA_TESTS ?= tests/test_mlp_energy.py tests/test_mlp_descent.py tests/test_descent.py tests/test_ebt_policy.py \
	tests/test_mlp_plan.py tests/test_op_boundary.py tests/test_cpu_isa.py tests/test_cpu_tuning.py \
	tests/test_rows_linear.py tests/test_ebt_rows.py tests/test_ebt.py
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

# The GPU machine's stack on this machine (no GPU needed; not part of `make test`): a separate venv with
# Python 3.12, the CUDA build of torch 2.11.0 and triton 3.6.0 (several GB, downloaded once: an existing
# venv with those versions is reused), then bench/gpu_suite.sh in its dry-run mode (the same build with
# every .cu, the import check, the GPU test command) and the whole suite (CPU kernels, Triton interpreter).
# numpy < 2.4: triton 3.6's interpreter turns 1-element arrays into ints, which numpy 2.4 refuses.
GPU_VENV ?= .venv-gpu
GPU_PY := $(GPU_VENV)/bin/python
GPU_TORCH_SPEC ?= torch==2.11.0
GPU_TRITON_SPEC ?= triton==3.6.0
GPU_OUT ?= bench/out/rehearsal

$(GPU_PY):
	@py=""; for c in python3.12 $$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.12*/bin/python3.12 2>/dev/null); do \
	  if $$c -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then py=$$c; break; fi; done; \
	if [ -z "$$py" ]; then py=$(PYTHON); echo "gpu-rehearsal: no Python 3.12 here; using $$($$py -V) (the device has 3.12)"; fi; \
	$$py -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q --upgrade pip

gpu-rehearsal: $(GPU_PY)
	@$(GPU_PY) -c "import torch, triton, sys; sys.exit(not ('$(GPU_TORCH_SPEC)'.endswith('=' + torch.__version__.split('+')[0]) and '$(GPU_TRITON_SPEC)'.endswith('=' + triton.__version__)))" 2>/dev/null \
	  || $(GPU_PY) -m pip install "$(GPU_TORCH_SPEC)" "$(GPU_TRITON_SPEC)"
	@$(GPU_PY) -c "import numpy, pybind11, setuptools, wheel, pytest, pytest_benchmark, hypothesis, xdist, rich, matplotlib, scipy, safetensors, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) >= (2, 4))" 2>/dev/null \
	  || $(GPU_PY) -m pip install -q "numpy<2.4" pybind11 setuptools wheel "pytest>=7" "pytest-benchmark>=4" "hypothesis>=6" pytest-xdist "rich>=13" "matplotlib>=3.6" "scipy>=1.9" "safetensors>=0.4"
	PYTHON=$(GPU_PY) PYEBM_GPU_SUITE_DRY=1 bash bench/gpu_suite.sh $(GPU_OUT)
	PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q -p no:cacheprovider tests $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info pyebm/_C*.so
