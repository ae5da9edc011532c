#!/usr/bin/env bash
# The GPU suite: build the CUDA extension, run the GPU tests, then the GPU benchmarks; tables and logs go
# to one folder. Meant for a machine with a CUDA GPU, a CUDA build of torch, nvcc, CMake and Ninja, and
# no network (nothing is downloaded). Whole run under 8 minutes; the summary is printed last.
#
#   bash bench/gpu_suite.sh [OUT_DIR]       (default: $OUT, else bench/out)
#   PYTHON=/path/to/python bash bench/gpu_suite.sh
#
# Exit status: 0 all stages passed, 1 a stage failed (see the summary and its log), 2 no usable GPU or
# toolchain (nothing was built or run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-$ROOT/bench/out}}"
PY="${PYTHON:-python3}"
BUDGET_S="${PYEBM_SUITE_BUDGET_S:-470}"   # the whole suite, seconds
START=$(date +%s)
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

say() { echo "gpu_suite: $*"; }
note() { echo "$*" >>"$SUMMARY"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# Seconds for the next stage: its own cap, or what is left of the budget if less (at least 10).
cap() { local l; l=$(left); if [ "$l" -lt "$1" ]; then echo $((l > 10 ? l : 10)); else echo "$1"; fi; }

# ---- 0. fail fast without a GPU or a CUDA toolchain -------------------------------------------------
if ! command -v "$PY" >/dev/null 2>&1; then
  say "no CUDA GPU usable: python '$PY' not found"; exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! nvidia-smi -L >/dev/null 2>&1; then
    say "no CUDA GPU: nvidia-smi finds no device"; exit 2
  fi
fi
probe=$("$PY" - <<'EOF' 2>&1
import torch
if not torch.cuda.is_available():
    print("NOGPU torch", torch.__version__, "sees no CUDA device (torch.version.cuda =", torch.version.cuda, ")")
else:
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs;", "torch", torch.__version__,
          "cuda", torch.version.cuda)
EOF
)
case "$probe" in
  GPU*) ;;
  *) say "no CUDA GPU: ${probe:-torch did not start}"; exit 2 ;;
esac
NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[ -x "$NVCC" ] || NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ]; then say "no CUDA toolchain: nvcc not found (set CUDA_HOME)"; exit 2; fi
for tool in cmake ninja; do
  command -v "$tool" >/dev/null 2>&1 || "$PY" -c "import $tool" >/dev/null 2>&1 \
    || { say "no build tool: $tool not found"; exit 2; }
done
say "$probe"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "device: $probe"
  echo "nvcc: $("$NVCC" --version | tail -n 2 | head -n 1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
} >"$OUT_DIR/env.txt"
note "device: $probe"

status=0
stage() {  # stage NAME LOG CAP_S cmd...
  local name=$1 log=$2 limit; limit=$(cap "$3"); shift 3
  local t0 rc; t0=$(date +%s)
  say "[$name] (limit ${limit}s) $*"
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1; rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then note "$(printf '%-22s ok      %4ds  %s' "$name" "$dt" "$(basename "$log")")"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then note "$(printf '%-22s TIMEOUT %4ds  %s' "$name" "$dt" "$(basename "$log")")"; status=1
  else note "$(printf '%-22s FAILED  %4ds  %s (exit %d)' "$name" "$dt" "$(basename "$log")" "$rc")"; status=1
  fi
  return $rc
}

# ---- 1. build the extension with the CUDA kernels, in place (no install, no download) -------------
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}"
if stage build "$OUT_DIR/build.log" 260 env PYEBM_WITH_CUDA=1 "$PY" setup.py -q build_ext --inplace; then
  if ! "$PY" -c "import pyebm, sys; r = pyebm.backends(); print(r); sys.exit(0 if r['cuda'] else 1)" \
      >>"$OUT_DIR/build.log" 2>&1; then
    note "build: the extension imports but the cuda backend is not usable (see build.log)"; status=1
  fi
fi
tail -n 1 "$OUT_DIR/build.log" | sed 's/^/  /' >>"$SUMMARY"

# ---- 2. GPU tests -----------------------------------------------------------------------------------
stage gpu-tests "$OUT_DIR/gpu_tests.log" 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
tail -n 1 "$OUT_DIR/gpu_tests.log" | sed 's/^/  /' >>"$SUMMARY"

# ---- 3. GPU benchmarks (each script takes --device cuda; tables to bench.txt, JSON beside it) -------
: >"$OUT_DIR/bench.txt"
for script in bench/bench_mlp_energy.py bench/bench_policy.py bench/bench_ebt.py; do
  [ -f "$script" ] || continue
  name=$(basename "$script" .py)
  if ! "$PY" "$script" --help 2>/dev/null | grep -q -- "--device"; then
    note "$(printf '%-22s skipped (no --device option)' "$name")"; continue
  fi
  [ "$(left)" -gt 20 ] || { note "$(printf '%-22s skipped (suite time budget spent)' "$name")"; continue; }
  json=()
  "$PY" "$script" --help 2>/dev/null | grep -q -- "--json" && json=(--json "$OUT_DIR/$name.json")
  stage "$name" "$OUT_DIR/$name.log" 150 "$PY" "$script" --device cuda "${json[@]}"
  { echo "==== $name ===="; cat "$OUT_DIR/$name.log"; echo; } >>"$OUT_DIR/bench.txt"
  rm -f "$OUT_DIR/$name.log"
done

# ---- summary (last) -------------------------------------------------------------------------------
echo
echo "==== benchmark tables ===="
tail -n 60 "$OUT_DIR/bench.txt"
echo
echo "==== gpu_suite summary ($(( $(date +%s) - START ))s; files in $OUT_DIR) ===="
cat "$SUMMARY"
[ $status -eq 0 ] && echo "gpu_suite: all stages passed" || echo "gpu_suite: some stages FAILED"
exit $status
