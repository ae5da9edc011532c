#!/usr/bin/env python3
"""Compile every csrc/cuda/*.cu with nvcc alone (CMake target ``pyebm_cuda_check``), no GPU needed.

This proves that the CUDA sources and their ATen glue compile for sm_90 against the installed torch
(a CPU build of torch is enough); it does not run them. Exit status: 0 when they compile or when there
is no nvcc (then it prints "skipped: nvcc not found"), 1 when compilation fails.

    python tools/cuda_check.py [--build-dir DIR] [--keep] [--jobs N] [--verbose]

nvcc is looked up in $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin and then on PATH.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", default=None, help="CMake build folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary build folder")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--verbose", action="store_true", help="print the full compiler output")
    args = ap.parse_args(argv)

    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    nvcc = find_nvcc()
    if nvcc is None:
        print("cuda-check: skipped: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return 0
    if not sources:
        print("cuda-check: skipped: no csrc/cuda/*.cu sources")
        return 0
    cmake = shutil.which("cmake")
    if cmake is None:
        print("cuda-check: FAILED: cmake not found")
        return 1
    try:
        import torch
    except ImportError as exc:
        print(f"cuda-check: FAILED: torch is needed for its headers and CMake files ({exc})")
        return 1

    tmp = None
    if args.build_dir:
        build = Path(args.build_dir).resolve()
        build.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="pyebm-cuda-check-")
        build = Path(tmp)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = [
        cmake, str(ROOT), *generator,
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DPython3_EXECUTABLE={sys.executable}",
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        # a CUDA build of torch looks for the toolkit through FindCUDA: name its root (see setup.py)
        f"-DCUDA_TOOLKIT_ROOT_DIR={os.path.dirname(os.path.dirname(nvcc))}",
        f"-DCUDAToolkit_ROOT={os.path.dirname(os.path.dirname(nvcc))}",
        "-DCMAKE_CUDA_ARCHITECTURES=90",
        "-DPYEBM_WITH_CUDA=OFF",
        "-DPYEBM_CUDA_COMPILE_CHECK=ON",
    ]
    build_cmd = [cmake, "--build", ".", "--target", "pyebm_cuda_check", "-j", str(args.jobs)]
    names = ", ".join(str(s.relative_to(ROOT)) for s in sources)
    print(f"cuda-check: nvcc {nvcc}; torch {torch.__version__} (cuda {torch.version.cuda}); sources: {names}",
          flush=True)
    t0 = time.perf_counter()
    try:
        for step, cmd in (("configure", configure), ("build", build_cmd)):
            proc = subprocess.run(cmd, cwd=build, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if args.verbose:
                print(proc.stdout)
            if proc.returncode != 0:
                print(_tail(proc.stdout))
                print(f"cuda-check: FAILED at {step} (exit {proc.returncode}) after "
                      f"{time.perf_counter() - t0:.0f} s; build folder {build}")
                return 1
            if step == "build":
                spills = [ln for ln in proc.stdout.splitlines() if "spill" in ln.lower() and "warning" in ln.lower()]
                for ln in spills:
                    print(f"cuda-check: note: {ln.strip()}")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"cuda-check: OK: {len(sources)} CUDA source(s) compiled for sm_90 (+PTX) in "
          f"{time.perf_counter() - t0:.0f} s (compile only: nothing ran on a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
