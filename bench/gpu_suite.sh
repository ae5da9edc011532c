#!/usr/bin/env bash
# The GPU suite: build pyebm with its CUDA kernels, run every GPU test (CUDA C++ kernels, and the Triton
# kernels compiled for the GPU), then the GPU benchmarks. Meant for a machine with a CUDA GPU, a CUDA build
# of torch, triton, nvcc, CMake and Ninja, and no network: nothing is downloaded. About 8 minutes in all,
# build included; the summary is printed last. bench/GPU_RUN.md says how to run it on the H200 and what to
# record afterwards.
#
#   bash bench/gpu_suite.sh [OUT_DIR]       (default: $OUT, else bench/out)
#
# Environment:
#   PYTHON=python3                  the interpreter whose torch and triton are used
#   PYEBM_GPU_SUITE_DRY=1           rehearsal without a GPU (make gpu-rehearsal): the same build, import
#                                   check and test command (the GPU tests then skip); benchmarks only load
#   PYEBM_GPU_SUITE_STAGES=build,tests,bench   the stages to run (a rerun of what failed; the build is
#                                   incremental when build/ is still there, and is needed by the others)
#   PYEBM_GPU_SUITE_TESTS="..."     pytest arguments instead of the default GPU selection (e.g. "-k cuda_graph tests")
#   PYEBM_SUITE_BUDGET_S=470        seconds for the whole suite; each stage is also capped on its own
#   PYEBM_SUITE_CAP_SCALE=1         multiplies the budget and every cap (default 20 in a dry run: a small
#                                   shared machine compiles many times slower than the GPU machine's 16 cores)
#   PYEBM_BUILD_JOBS                compile jobs (default: every core)
#
# Output folder, at most 8 files:
#   summary.txt  environment, one line per stage, test counts, failing tests (also printed last)
#   build.log    CMake + nvcc output (ptxas resource report: registers, spills) and the import check
#   tests.log    pytest -v output (per-test lines, failures with tracebacks, slowest tests)
#   tests.xml    JUnit XML of the same run
#   bench.txt    every benchmark's table and log
#   bench_mlp_energy.json, bench_descent.json   every sample with machine and versions
#   bench_mlp_energy.png   latency against batch size, one line per backend
#
# Exit status: 0 every stage passed, 1 a stage failed (see the summary and its log), 2 no usable GPU or
# toolchain (nothing was built or run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${1:-${OUT:-$ROOT/bench/out}}"
PY="${PYTHON:-python3}"
DRY="${PYEBM_GPU_SUITE_DRY:-0}"
STAGES=",${PYEBM_GPU_SUITE_STAGES:-build,tests,bench},"
SCALE="${PYEBM_SUITE_CAP_SCALE:-$([ "$DRY" = 1 ] && echo 20 || echo 1)}"
BUDGET_S=$(( ${PYEBM_SUITE_BUDGET_S:-470} * SCALE ))
JOBS="${PYEBM_BUILD_JOBS:-$(nproc 2>/dev/null || echo 4)}"
START=$(date +%s)
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"

say() { echo "gpu_suite: $*"; }
note() { echo "$*" >>"$SUMMARY"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
# Seconds for the next stage: its own cap, or what is left of the budget if less (at least 10).
cap() { local l c=$(( $1 * SCALE )); l=$(left); if [ "$l" -lt "$c" ]; then echo $((l > 10 ? l : 10)); else echo "$c"; fi; }
want() { case "$STAGES" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
finish() {  # print the summary last and exit
  echo
  echo "==== gpu_suite summary ($(( $(date +%s) - START ))s; files in $OUT_DIR) ===="
  cat "$SUMMARY"
  exit "$1"
}

# ---- 0. the interpreter, the GPU and the toolchain -------------------------------------------------
if ! command -v "$PY" >/dev/null 2>&1; then
  note "no python: '$PY' not found"; finish 2
fi
PY="$(command -v "$PY")"
# cmake and ninja may be pip packages of that interpreter's environment, not on PATH
export PATH="$(dirname "$PY"):$PATH"
probe=$("$PY" - <<'EOF' 2>&1
import torch
try:
    import triton
    tv = triton.__version__
except Exception as exc:  # reported, not fatal: the CUDA C++ kernels need no triton
    tv = f"missing ({exc.__class__.__name__})"
head = f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {tv}"
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name} sm_{p.major}{p.minor} {p.multi_processor_count} SMs {p.total_memory / 2**30:.0f} GiB; {head}")
else:
    print(f"NOGPU {head}; torch sees no CUDA device")
EOF
)
case "$probe" in
  GPU*) ;;
  NOGPU*) if [ "$DRY" != 1 ]; then note "no CUDA GPU: ${probe#NOGPU }"; finish 2; fi ;;
  *) note "torch did not start: $probe"; finish 2 ;;
esac
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  fi
fi
if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then note "no CUDA toolchain: nvcc not found (set CUDA_HOME)"; finish 2; fi
export CUDA_HOME
for tool in cmake ninja; do
  command -v "$tool" >/dev/null 2>&1 || { note "no build tool: $tool not found"; finish 2; }
done
{
  echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit:  $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "device:  ${probe#*GPU }"
  echo "python:  $("$PY" -c 'import sys; print(sys.version.split()[0])') ($PY)"
  echo "nvcc:    $("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*, V[0-9.]*' || echo '?') ($CUDA_HOME)"
  echo "host:    $(nproc) cores, $(uname -r)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu:     $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
  fi
  [ "$DRY" = 1 ] && echo "mode:    DRY RUN (no GPU: GPU tests skip, benchmarks only load)"
} >>"$SUMMARY"
say "$(head -n 3 "$SUMMARY" | tail -n 1)"

status=0
stage() {  # stage NAME LOG CAP_S cmd...   (appends to LOG)
  local name=$1 log=$2 limit; limit=$(cap "$3"); shift 3
  local t0 rc; t0=$(date +%s)
  say "[$name] (limit ${limit}s) $*"
  echo "+ $*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1; rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then note "$(printf '%-18s ok      %4ds  %s' "$name" "$dt" "$(basename "$log")")"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    note "$(printf '%-18s TIMEOUT %4ds  %s (limit %ds)' "$name" "$dt" "$(basename "$log")" "$limit")"; status=1
  else note "$(printf '%-18s FAILED  %4ds  %s (exit %d)' "$name" "$dt" "$(basename "$log")" "$rc")"; status=1
  fi
  return $rc
}

# ---- 1. build in place: every core, sm_90 only, no download, no build isolation ---------------------
# pyebm then runs from this checkout (the repository root on sys.path; kernels/ maps to pyebm._kernels).
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
note "stages:"
if want build; then
  : >"$OUT_DIR/build.log"
  stage build "$OUT_DIR/build.log" 270 env PYEBM_WITH_CUDA=1 PYEBM_BUILD_JOBS="$JOBS" \
    PYEBM_CMAKE_ARGS="-DPYEBM_CUDA_ARCHITECTURES=90-real -DCMAKE_CUDA_FLAGS=-Xptxas=-v" \
    "$PY" setup.py build_ext --inplace
  built=$?
  # the longest compile steps, from ninja's log (its last entry per output: the build's critical path)
  nlog=$(ls -t build/temp.*/cmake/.ninja_log 2>/dev/null | head -n 1)
  if [ -n "$nlog" ]; then
    { echo "slowest compile steps (s):"
      awk 'NR > 1 { t[$4] = ($2 - $1) / 1000 } END { for (o in t) printf "%7.1f %s\n", t[o], o }' "$nlog" \
        | sort -rn | head -n 5; } >>"$OUT_DIR/build.log"
  fi
  if [ "$built" -ne 0 ]; then
    note "gpu_suite: the build failed: nothing else runs (build.log)"
    finish 1
  fi
fi
# the extension must import, with its CUDA kernels compiled in (usable too, unless this is a dry run)
if "$PY" - >>"$OUT_DIR/build.log" 2>&1 <<EOF
import sys, pyebm
from pyebm import _backend
info, rep = _backend.ext_info(), pyebm.backends()
print("import check:", pyebm.__file__, info, rep)
ok = info.get("built") and info.get("cuda") and ($DRY == 1 or (rep["cuda"] and rep["triton"]))
sys.exit(0 if ok else 1)
EOF
then note "$(printf '%-18s ok            %s' import-check "$("$PY" -c 'import pyebm; print(pyebm.backends())' 2>/dev/null)")"
else note "$(printf '%-18s FAILED        the extension (with CUDA) does not import or a GPU backend is not usable: build.log' import-check)"; status=1
fi

# ---- 2. GPU tests: the CUDA C++ kernels and the Triton kernels on CUDA tensors -----------------------
if want tests; then
  : >"$OUT_DIR/tests.log"
  # shellcheck disable=SC2206
  sel=(${PYEBM_GPU_SUITE_TESTS:--m gpu tests})
  par=()
  # Triton compiles every kernel specialisation on first use: spread that over the cores
  "$PY" -c "import xdist" >/dev/null 2>&1 && par=(-n "$(( JOBS < 8 ? JOBS : 8 ))")
  stage tests "$OUT_DIR/tests.log" 170 env PYTHONUNBUFFERED=1 TORCH_SHOW_CPP_STACKTRACES=1 \
    "$PY" -m pytest -p no:cacheprovider -v -rfEs --durations=15 --junitxml="$OUT_DIR/tests.xml" "${par[@]}" "${sel[@]}"
  counts=$(grep -E '^=+ .*(passed|failed|error|skipped|no tests ran).* =+$' "$OUT_DIR/tests.log" | tail -n 1 | tr -d '=')
  note "  tests:${counts:- (no result line: see tests.log)}"
  grep -E '^(FAILED|ERROR) ' "$OUT_DIR/tests.log" | head -n 15 | sed 's/^/  /' >>"$SUMMARY"
  if [ "$DRY" = 1 ]; then
    # -rs lines: "SKIPPED [count] file:line: reason"; the counts summed per reason
    sed -nE 's/^SKIPPED \[([0-9]+)\] [^ ]+: (.*)$/\1\t\2/p' "$OUT_DIR/tests.log" \
      | awk -F'\t' '{ n[$2] += $1 } END { for (r in n) printf "  skipped: %5d  %s\n", n[r], r }' \
      | sort -k2,2nr | head -n 4 >>"$SUMMARY"
  fi
fi

# ---- 3. GPU benchmarks (each script that takes --device; tables and logs to bench.txt) ---------------
# bench_ebt: EBT generation per token and one think, eager against EBT(..., cuda_graph=True).
if want bench; then
  : >"$OUT_DIR/bench.txt"
  for script in bench/bench_mlp_energy.py bench/bench_descent.py bench/bench_policy.py bench/bench_ebt.py; do
    [ -f "$script" ] || continue
    name=$(basename "$script" .py)
    help=$("$PY" "$script" --help 2>&1) || { note "$(printf '%-18s FAILED  (--help: %s)' "$name" "$(echo "$help" | tail -n 1)")"; status=1; continue; }
    if ! grep -q -- "--device" <<<"$help"; then
      note "$(printf '%-18s skipped (no --device option)' "$name")"; continue
    fi
    if [ "$DRY" = 1 ]; then note "$(printf '%-18s loads   (dry run: not timed)' "$name")"; continue; fi
    [ "$(left)" -gt 25 ] || { note "$(printf '%-18s skipped (suite time budget spent)' "$name")"; continue; }
    args=(--device cuda --quick)
    # a --json that takes a file (bench_ebt's --json prints to stdout: its tables go to bench.txt only, and
    # the output folder keeps to 8 files)
    grep -qE -- "--json [A-Z]" <<<"$help" && args+=(--json "$OUT_DIR/$name.json")
    [ "$name" = bench_mlp_energy ] && grep -q -- "--plot" <<<"$help" && args+=(--plot "$OUT_DIR/$name.png")
    echo "==== $name ${args[*]} ====" >>"$OUT_DIR/bench.txt"
    stage "$name" "$OUT_DIR/bench.txt" 110 env PYTHONUNBUFFERED=1 "$PY" "$script" "${args[@]}"
    echo >>"$OUT_DIR/bench.txt"
  done
fi

# ---- summary (last) ------------------------------------------------------------------------------
nfiles=$(find "$OUT_DIR" -maxdepth 1 -type f | wc -l)
[ "$nfiles" -le 8 ] || note "warning: $nfiles files in $OUT_DIR (the device returns at most 8)"
if want bench && [ -s "$OUT_DIR/bench.txt" ] && [ "$DRY" != 1 ]; then
  echo "==== benchmark tables (bench.txt) ===="
  grep -E '^(#|\|)' "$OUT_DIR/bench.txt" | tail -n 60
fi
if [ $status -eq 0 ]; then note "gpu_suite: every stage passed"; else note "gpu_suite: some stages FAILED (read the log named on their line)"; fi
finish $status
