"""Build script: CMake (with Ninja) builds the compiled module pyebm._C from csrc/.

PYEBM_BUILD_EXT=0      install without compiling (pure Python; every op runs through pyebm.reference)
PYEBM_WITH_CUDA=0|1    force the CUDA kernels off/on (default: on when torch is a CUDA build and nvcc exists)
PYEBM_CMAKE_ARGS="..." extra arguments for CMake
Install with `pip install --no-build-isolation -e .` so that the torch already installed is used.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "pyebm" / "_version.py").read_text()).group(1)


def _want_extension() -> bool:
    return os.environ.get("PYEBM_BUILD_EXT", "1") != "0"


def _nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for cand in (os.path.join(cuda_home, "bin", "nvcc"), shutil.which("nvcc")):
        if cand and os.path.exists(cand):
            return cand
    return None


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = _nvcc()
        with_cuda = os.environ.get("PYEBM_WITH_CUDA")
        if with_cuda is None:
            with_cuda = "1" if (torch.version.cuda and nvcc) else "0"
        args = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PYEBM_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPYEBM_VERSION={VERSION}",
            f"-DPYEBM_WITH_CUDA={'ON' if with_cuda == '1' else 'OFF'}",
        ]
        if with_cuda == "1" and nvcc:
            # torch's CMake config finds the toolkit through FindCUDA, which guesses the root from the nvcc
            # on PATH (a wrapper script in /usr/local/bin gives /usr/local); name it from the nvcc used.
            toolkit = os.path.dirname(os.path.dirname(nvcc))
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}",
                     f"-DCUDAToolkit_ROOT={toolkit}"]
        args += os.environ.get("PYEBM_CMAKE_ARGS", "").split()
        # Progress goes to the terminal as it happens (pip shows it with -v): CMake's configure lines, then
        # Ninja's "[done/total] Building CXX object ..." line per file.
        _say(f"configuring pyebm._C with CMake (CUDA kernels {'on' if with_cuda == '1' else 'off'}) in {build_dir}")
        subprocess.check_call(args, cwd=build_dir)
        jobs = os.environ.get("PYEBM_BUILD_JOBS", str(os.cpu_count() or 1))
        _say(f"compiling pyebm._C with Ninja, {jobs} jobs: a few minutes on 2 cores, one [done/total] line per file")
        subprocess.check_call(["cmake", "--build", ".", "--target", "_C", "-j", jobs], cwd=build_dir)
        _say("pyebm._C built")


def _say(msg: str) -> None:
    print(f"pyebm build: {msg}", file=sys.stderr, flush=True)


setup(
    version=VERSION,
    packages=find_packages(include=["pyebm", "pyebm.*"]) + ["pyebm._kernels"],
    package_dir={"pyebm._kernels": "kernels"},
    ext_modules=[CMakeExtension("pyebm._C")] if _want_extension() else [],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
