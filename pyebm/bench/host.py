"""What a benchmark ran on, and how busy the host was while it ran.

``machine_info`` records the machine once per run: CPU model, the instruction set the CPU kernels use,
cores, frequency governor, GPU and driver, versions and commit. ``host_state`` is a cheap snapshot taken
before and after each size of a suite: load average, CPU frequencies and the other running threads.
``host_warnings`` turns two snapshots into the warnings printed under the table.
"""
from __future__ import annotations

import glob
import os
import platform
import subprocess
from datetime import datetime, timezone
from typing import Dict, List, Optional

import torch

# A host is called loaded when the 1-minute load average, less the threads this process runs, exceeds this
# share of the cores, or when another thread is running at a snapshot (on a shared machine both happen).
LOAD_EXCESS_WARN = 0.5
# Mean CPU frequency changing by more than this fraction between two snapshots (turbo, thermal, governor).
FREQ_CHANGE_WARN = 0.10


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_model() -> Optional[str]:
    """"model name" of /proc/cpuinfo (x86), else the platform's processor string."""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and val.strip():
            return val.strip()
    return platform.processor() or None


def cpu_flags() -> List[str]:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return val.split()
    return []


def isa_from_flags(flags) -> str:
    """The widest instruction set the CPU kernels select for these /proc/cpuinfo flags (the same test as
    csrc/cpu/vec_act.h: AVX-512 needs avx512f and avx512dq; AVX2 needs avx2 and fma)."""
    f = set(flags)
    if {"avx512f", "avx512dq"} <= f:
        return "avx512"
    if {"avx2", "fma"} <= f:
        return "avx2"
    return "baseline"


def kernel_isa() -> Dict[str, Optional[str]]:
    """``{"isa": ..., "source": ...}``: what the built extension reports, else what the CPU flags imply."""
    try:
        from pyebm import _backend

        info = _backend.ext_info()
        if info.get("built") and info.get("cpu_isa"):
            return {"isa": str(info["cpu_isa"]), "source": "pyebm._C.build_info()"}
    except Exception:  # pragma: no cover - no extension, or an older one
        pass
    flags = cpu_flags()
    if not flags:
        return {"isa": None, "source": "unknown (no /proc/cpuinfo flags)"}
    return {"isa": isa_from_flags(flags), "source": "/proc/cpuinfo flags"}


def governor() -> Optional[str]:
    g = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    return g.strip() if g else None


def cpu_freqs_mhz() -> Optional[List[float]]:
    """Current frequency of every CPU (scaling_cur_freq), MHz; None where the kernel does not expose it."""
    out = []
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")):
        v = _read(path)
        if v and v.strip().isdigit():
            out.append(int(v) / 1000.0)
    return out or None


def other_running_threads() -> Optional[int]:
    """Threads of other processes in state R (running or runnable) right now; None without /proc."""
    me = os.getpid()
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    n = 0
    for pid in pids:
        if pid == me:
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            stat = _read(f"/proc/{pid}/task/{tid}/stat")
            if not stat:
                continue
            # "pid (comm) S ...": the state follows the last ')' (comm may contain spaces and parentheses)
            state = stat[stat.rfind(")") + 2:stat.rfind(")") + 3]
            if state == "R":
                n += 1
    return n


def host_state() -> Dict[str, object]:
    """A snapshot: load averages, CPU frequencies (MHz) and other running threads."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loadavg": load,
            "cpu_mhz": cpu_freqs_mhz(), "other_running_threads": other_running_threads()}


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def host_warnings(before: Optional[Dict[str, object]], after: Optional[Dict[str, object]],
                  threads: Optional[int] = None, cores: Optional[int] = None) -> List[str]:
    """Why the host's state may have made the timings between two snapshots unreliable (empty if none)."""
    cores = cores or _usable_cores()
    threads = threads if threads is not None else torch.get_num_threads()
    out = []
    snaps = [s for s in (before, after) if s]
    loads = [s["loadavg"][0] for s in snaps if s.get("loadavg")]
    if loads:
        excess = max(loads) - min(threads, cores)
        if excess > LOAD_EXCESS_WARN * cores:
            out.append(f"host loaded: 1-min load average {max(loads):.2f} on {cores} cores "
                       f"({excess:.2f} beyond this run's {min(threads, cores)} threads)")
    others = [s["other_running_threads"] for s in snaps if s.get("other_running_threads") is not None]
    if others and max(others) > 0:
        out.append(f"{max(others)} other thread(s) running on the host during the measurement")
    if before and after and before.get("cpu_mhz") and after.get("cpu_mhz"):
        f0 = sum(before["cpu_mhz"]) / len(before["cpu_mhz"])
        f1 = sum(after["cpu_mhz"]) / len(after["cpu_mhz"])
        if f0 > 0 and abs(f1 - f0) / f0 > FREQ_CHANGE_WARN:
            out.append(f"CPU frequency changed from {f0:.0f} to {f1:.0f} MHz during the measurement")
    return out


def _git_commit() -> Dict[str, object]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        commit = subprocess.check_output(["git", "-C", root, "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except Exception:
        return {"commit": None, "dirty": None}
    try:
        dirty = bool(subprocess.check_output(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                                             text=True, stderr=subprocess.DEVNULL).strip())
    except Exception:
        dirty = None
    return {"commit": commit, "dirty": dirty}


def _gpu_info(device: str) -> Dict[str, object]:
    out: Dict[str, object] = {}
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return out
    out["gpu"] = torch.cuda.get_device_name()
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    out["gpu_capability"] = f"sm_{p.major}{p.minor}"
    out["gpu_sms"] = p.multi_processor_count
    out["cuda"] = torch.version.cuda
    driver = None
    try:
        driver = subprocess.check_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         text=True, stderr=subprocess.DEVNULL, timeout=10).splitlines()[0].strip()
    except Exception:
        text = _read("/proc/driver/nvidia/version")
        if text:
            for tok in text.split():
                if tok[:1].isdigit() and "." in tok:
                    driver = tok
                    break
    out["gpu_driver"] = driver
    return out


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """The machine, the software and the commit of a run (the ``meta`` of a result's JSON)."""
    model = cpu_model()
    isa = kernel_isa()
    info: Dict[str, object] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": model or platform.machine(),
        "cpu_model": model,
        "cpu_isa": isa["isa"],
        "cpu_isa_source": isa["source"],
        "cpu_count": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "governor": governor(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    for var in ("PYEBM_CPU_SMALL_GEMM", "PYEBM_CPU_BLOCK_BYTES", "PYEBM_CPU_SPLIT_FLOPS"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    try:
        from pyebm import _backend

        tuning = _backend.ext_info().get("cpu_tuning")
        if tuning:
            info["cpu_block_bytes"] = tuning["block_bytes"]
            info["cpu_l2_bytes"] = tuning["l2_bytes"]
    except Exception:  # pragma: no cover - no extension
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info.update(_gpu_info(device))
    try:
        import pyebm

        info["pyebm"] = pyebm.__version__
    except Exception:  # pragma: no cover
        info["pyebm"] = None
    info.update(_git_commit())
    return info
