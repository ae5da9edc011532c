"""Benchmark results: cases, ratios to the eager baseline, FLOP rates against a same-FLOP GEMM, and the
renderings (plain/markdown table, rich table, JSON, PNG plot)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Dict, List, Optional

import torch

from pyebm.bench.timing import Timing

GEMM_COLUMN = "same-FLOP GEMM"


@dataclass
class Case:
    """One measured column at one size of one suite."""

    suite: str
    size: str
    column: str
    timing: Timing
    flops: Optional[float] = None  # per call
    baseline: bool = False  # the eager column that ratios are taken against
    params: Dict[str, object] = field(default_factory=dict)  # shape of the size (B, K, ...)
    alloc_bytes: Optional[int] = None  # bytes allocated per call (profiler), where measured
    note: str = ""

    @property
    def median_us(self) -> float:
        return self.timing.median * 1e6

    @property
    def gflops(self) -> Optional[float]:
        return None if not self.flops else self.flops / self.timing.median / 1e9


def machine_info(device: str = "cpu") -> Dict[str, object]:
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import pyebm

        info["pyebm"] = pyebm.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        info["commit"] = subprocess.check_output(["git", "-C", root, "rev-parse", "--short", "HEAD"], text=True,
                                                 stderr=subprocess.DEVNULL).strip()
    except Exception:
        info["commit"] = None
    return info


class BenchResult:
    """A list of cases plus the machine they ran on. Prints as a table; converts to dict / JSON."""

    def __init__(self, cases: List[Case], meta: Optional[Dict[str, object]] = None):
        self.cases = list(cases)
        self.meta = meta or machine_info()

    # -- derived figures ---------------------------------------------------------------------------
    def _group(self, case: Case):
        return [c for c in self.cases if c.suite == case.suite and c.size == case.size]

    def vs_baseline(self, case: Case) -> Optional[float]:
        base = [c for c in self._group(case) if c.baseline]
        return base[0].timing.median / case.timing.median if base else None

    def pct_gemm(self, case: Case) -> Optional[float]:
        gemm = [c for c in self._group(case) if c.column == GEMM_COLUMN]
        if not gemm or not case.flops or not gemm[0].flops:
            return None
        return 100.0 * (case.flops / case.timing.median) / (gemm[0].flops / gemm[0].timing.median)

    def rows(self) -> List[Dict[str, object]]:
        out = []
        for c in self.cases:
            out.append({
                "suite": c.suite, "size": c.size, "column": c.column, "median_us": c.median_us,
                "min_us": c.timing.min * 1e6, "max_us": c.timing.max * 1e6, "p90_us": c.timing.p90 * 1e6,
                "vs_eager": self.vs_baseline(c), "gflops": c.gflops, "pct_gemm": self.pct_gemm(c),
                "alloc_bytes": c.alloc_bytes, "note": c.note, "params": c.params,
            })
        return out

    def to_dict(self) -> Dict[str, object]:
        rows = self.rows()
        for r, c in zip(rows, self.cases):
            r["samples_s"] = list(c.timing.samples)
            r["calls_per_sample"] = c.timing.calls_per_sample
            r["flops"] = c.flops
        return {"meta": self.meta, "rows": rows}

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str)

    # -- renderings ----------------------------------------------------------------------------------
    HEADERS = ("suite", "size", "column", "median us", "p90 us", "x eager", "GFLOP/s", "% GEMM", "alloc/call")

    def _cells(self, r) -> List[str]:
        def f(v, spec):
            return "-" if v is None else format(v, spec)

        alloc = r["alloc_bytes"]
        alloc_s = "-" if alloc is None else (f"{alloc / 2**20:.2f} MiB" if alloc >= 2**20 else f"{alloc / 1024:.1f} KiB")
        return [r["suite"], r["size"], r["column"] + (f" ({r['note']})" if r["note"] else ""), f(r["median_us"], ".1f"),
                f(r["p90_us"], ".1f"), f(r["vs_eager"], ".2f"), f(r["gflops"], ".2f"), f(r["pct_gemm"], ".0f"), alloc_s]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.HEADERS) + " |", "|" + "---|" * 3 + "---:|" * (len(self.HEADERS) - 3)]
        for r in self.rows():
            lines.append("| " + " | ".join(self._cells(r)) + " |")
        return "\n".join(lines)

    __str__ = markdown

    def print_rich(self) -> None:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self.markdown())
            return
        table = Table(title=f"pyebm bench - {self.meta.get('processor')} - {self.meta.get('threads')} threads - "
                            f"torch {self.meta.get('torch')} - commit {self.meta.get('commit')}")
        for i, h in enumerate(self.HEADERS):
            table.add_column(h, justify="left" if i < 3 else "right")
        last = None
        for r in self.rows():
            key = (r["suite"], r["size"])
            if last is not None and key != last:
                table.add_section()
            last = key
            cells = self._cells(r)
            style = "bold green" if (r["vs_eager"] or 0) >= 1.0 and not r["column"].startswith(("eager", GEMM_COLUMN)) else None
            table.add_row(*cells, style=style)
        console = Console()
        if not console.is_terminal:  # files and pipes: wide enough that no cell is cut
            console = Console(width=max(console.width, 150))
        console.print(table)

    def plot(self, path: str) -> None:
        """Latency against batch size, one line per column, log scale (cases with a 'batch' param)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        suites = sorted({c.suite for c in self.cases if "batch" in c.params})
        if not suites:
            raise ValueError("plot: no case has a 'batch' parameter (run a suite with a batch sweep)")
        fig, axes = plt.subplots(1, len(suites), figsize=(6 * len(suites), 4.5), squeeze=False)
        for ax, suite in zip(axes[0], suites):
            cols: Dict[str, List] = {}
            for c in self.cases:
                if c.suite == suite and "batch" in c.params:
                    cols.setdefault(c.column, []).append((c.params["batch"], c.timing.median * 1e6))
            for col, pts in cols.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=col)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size (contexts)")
            ax.set_ylabel("median latency (us)")
            ax.set_title(f"{suite} ({self.meta.get('device')}, {self.meta.get('threads')} threads)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
