"""Bytes a call allocates: what the eager path's autograd graph costs against the fused path."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Optional

import torch


def alloc_per_call(fn: Callable[[], object], device: str = "cpu") -> Optional[int]:
    """GPU: peak bytes allocated above the starting point during one call (max_memory_allocated).
    CPU: total bytes allocated during one call (sum of the profiler's positive self allocations).
    Returns None when it cannot be measured here."""
    fn()  # warm: lazy initialisation does not count
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover
        return None
    # The profiler's C++ side prints start/stop lines on file descriptor 2; keep the table clean.
    with _quiet_fd2():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    return int(sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0))


@contextlib.contextmanager
def _quiet_fd2():
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (e.g. captured by a test runner)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
