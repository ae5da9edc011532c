"""Backend discovery and choice.

Four backends compute the same ops:

* ``torch``  - the plain PyTorch reference (``pyebm.reference``); always usable.
* ``cpu``    - fused C++ kernels in the compiled extension ``pyebm._C`` (CPU tensors).
* ``triton`` - Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
* ``cuda``   - CUDA C++ kernels in ``pyebm._C`` (CUDA tensors, built with a CUDA torch).

``PYEBM_BACKEND=auto|torch|cpu|triton|cuda`` chooses (default ``auto``: the fastest usable backend
for the tensors' device). Asking for an unusable backend by name is an error that says why.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")

_ext = None
_ext_error: Optional[str] = None
if os.environ.get("PYEBM_DISABLE_EXT", "0") == "1":
    _ext_error = "disabled by PYEBM_DISABLE_EXT=1"
else:
    try:
        from pyebm import _C as _ext  # noqa: F401  (importing it registers the C++ ops)
    except ImportError as exc:  # pure-Python install (PYEBM_BUILD_EXT=0) or a broken build
        _ext = None
        _ext_error = f"extension pyebm._C not built ({exc})"

_triton_error: Optional[str] = None
try:
    import triton  # noqa: F401
except ImportError as exc:
    triton = None
    _triton_error = f"triton not installed ({exc})"


# -- fork safety -------------------------------------------------------------------------------------
# GNU OpenMP, the thread pool of torch's CPU builds (at::parallel_for, which pyebm's CPU kernels use, and the
# BLAS), cannot run a parallel region in a child forked after the parent started the pool: the child waits
# forever for pool threads that do not exist in it. torch's own ops hang there the same way (data loader
# workers avoid it by running single-threaded). A child forked from a process whose pool may exist (more
# than one thread at fork time) therefore starts with one intra-op thread; it may raise the count again
# with torch.set_num_threads() where its OpenMP runtime is fork-safe.
_FORK = {"pool": False}


def _pool_may_exist() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) > 1
    except OSError:  # not Linux: assume it may
        return True


def _before_fork() -> None:
    _FORK["pool"] = _pool_may_exist()


def _after_fork_in_child() -> None:
    if _FORK["pool"] and torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork") and "OpenMP" in torch.__config__.parallel_info():
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def triton_interpret() -> bool:
    """True when Triton kernels run in interpreter mode (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def ext():
    """The compiled extension module, or None."""
    return _ext


def ext_info() -> Dict[str, object]:
    if _ext is None:
        return {"built": False, "why": _ext_error}
    info = dict(_ext.build_info())
    info["built"] = True
    tuning = getattr(_ext, "cpu_tuning", None)
    if tuning is not None:
        info["cpu_tuning"] = dict(tuning())
    return info


# What each backend's kernels have been verified on. Until a kernel has run on a GPU, this says so.
VERIFICATION = {
    "torch": "reference implementation",
    "cpu": "tested against the reference on CPU",
    "triton": "tested against the reference under TRITON_INTERPRET=1 only; not yet verified on a GPU",
    "cuda": "compiled for sm_90 and tested in a CPU emulation only; not yet verified on GPU hardware",
}


class BackendReport(dict):
    """``{name: usable}`` with ``.why[name]`` saying why a backend is not usable (``None`` if it is) and
    ``.verified[name]`` saying what its kernels have been verified on."""

    def __init__(self, usable: Dict[str, bool], why: Dict[str, Optional[str]]):
        super().__init__(usable)
        self.why = why
        self.verified = dict(VERIFICATION)

    def __repr__(self) -> str:
        parts = []
        for name, ok in self.items():
            parts.append(f"{name}: {'yes' if ok else 'no (' + str(self.why[name]) + ')'}")
        return "{" + ", ".join(parts) + "}"


_REPORT: Optional[BackendReport] = None


def backends(refresh: bool = False) -> BackendReport:
    """Report which backends are usable on this machine, and why not where they are not.

    The report is computed once per process (``refresh=True`` recomputes it, e.g. after changing
    ``TRITON_INTERPRET``); ``resolve`` uses it on every call.
    """
    global _REPORT
    if _REPORT is not None and not refresh:
        return _REPORT
    _REPORT = _compute_report()
    _RESOLVED.clear()
    _CPU_RESOLVED.clear()
    return _REPORT


def _compute_report() -> BackendReport:
    usable: Dict[str, bool] = {"torch": True}
    why: Dict[str, Optional[str]] = {"torch": None}

    usable["cpu"] = _ext is not None
    why["cpu"] = None if _ext is not None else _ext_error

    if triton is None:
        usable["triton"], why["triton"] = False, _triton_error
    elif torch.cuda.is_available():
        usable["triton"], why["triton"] = True, None
    elif triton_interpret():
        usable["triton"], why["triton"] = True, None
    else:
        usable["triton"], why["triton"] = False, "no GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"

    if _ext is None:
        usable["cuda"], why["cuda"] = False, _ext_error
    elif not _ext.build_info().get("cuda", False):
        usable["cuda"], why["cuda"] = False, "extension built without CUDA (CPU-only torch or no nvcc)"
    elif not torch.cuda.is_available():
        usable["cuda"], why["cuda"] = False, "no GPU"
    else:
        usable["cuda"], why["cuda"] = True, None
    return BackendReport(usable, why)


def requested_backend() -> str:
    name = os.environ.get("PYEBM_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"PYEBM_BACKEND must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    return name


_RESOLVED: Dict[tuple, str] = {}

# The process environment as CPython keeps it (bytes keys on POSIX): a dict lookup instead of os.environ's
# Mapping layers, on a path that runs on every op call. Falls back to os.environ where it is not there.
_ENV_DATA = getattr(os.environ, "_data", None)
if not isinstance(_ENV_DATA, dict) or os.name != "posix":
    _ENV_DATA = None


def _env_pair():
    if _ENV_DATA is not None:
        return _ENV_DATA.get(b"PYEBM_BACKEND"), _ENV_DATA.get(b"TRITON_INTERPRET")
    return os.environ.get("PYEBM_BACKEND"), os.environ.get("TRITON_INTERPRET")


def resolve(device, backend: Optional[str] = None, supported=BACKENDS) -> str:
    """Pick the backend for tensors on ``device`` (cached: this runs on every op call)."""
    dtype_key = device.type if isinstance(device, torch.device) else str(device)
    key = (dtype_key, backend, _env_pair(), supported, _REPORT is None)
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    name = _resolve(device, backend, supported)
    _RESOLVED[key] = name
    return name


_CPU_RESOLVED: Dict[tuple, bool] = {}


def resolves_to_cpu(backend: Optional[str] = None) -> bool:
    """resolve(cpu device, backend, all backends) == "cpu", with a smaller cache key (the eager fast paths)."""
    env = _ENV_DATA
    if env is not None:  # _env_pair() inlined: this runs on every eager energy call
        key = (backend, (env.get(b"PYEBM_BACKEND"), env.get(b"TRITON_INTERPRET")), _REPORT is None)
    else:
        key = (backend, _env_pair(), _REPORT is None)
    hit = _CPU_RESOLVED.get(key)
    if hit is None:
        hit = _CPU_RESOLVED[key] = resolve(torch.device("cpu"), backend, BACKENDS) == "cpu"
    return hit


def _resolve(device, backend: Optional[str] = None, supported=BACKENDS) -> str:
    """Pick the backend for tensors on ``device``.

    ``backend`` overrides ``PYEBM_BACKEND``. ``supported`` lists the backends the caller has kernels
    for (every op has ``torch``). An explicit choice that cannot run on ``device`` raises ValueError.
    """
    name = (backend or requested_backend()).lower()
    report = _REPORT if _REPORT is not None else backends()
    if name == "auto":
        if device.type == "cuda":
            order = ("cuda", "triton", "torch")
        elif device.type == "cpu":
            order = ("cpu", "torch")
        else:
            order = ("torch",)
        for cand in order:
            if cand in supported and report[cand]:
                return cand
        return "torch"
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    if name not in supported:
        raise ValueError(f"backend {name!r} has no kernel for this op (supported: {', '.join(supported)})")
    if not report[name]:
        raise ValueError(f"backend {name!r} is not usable: {report.why[name]}")
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors; got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors; got tensors on {device}")
    if name == "triton" and device.type == "cpu" and not triton_interpret():
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return name


# The report is computed on import, so that the first op call inside a torch.compile region reads a
# constant instead of probing the extension (which Dynamo cannot trace).
backends()
