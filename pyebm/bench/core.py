"""Benchmark results: cases, ratios to the eager baseline with their bootstrap intervals, FLOP rates
against a same-FLOP GEMM, noise warnings, and the renderings (markdown table, rich table, JSON, CSV, plot).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from pyebm import _dtypes
from pyebm.bench import stats
from pyebm.bench.host import host_warnings, machine_info  # noqa: F401  (machine_info: public here too)
from pyebm.bench.timing import Timing, measure_interleaved

GEMM_COLUMN = "same-FLOP GEMM"
# Keys a row's shape names last, after the suite's own dimensions.
_RUN_KEYS = ("dtype", "threads", "device")
_SHORT = {"context_dim": "ctx"}  # shorter names in the shape label


@dataclass
class Case:
    """One measured column at one size of one suite."""

    suite: str
    size: str
    column: str
    timing: Timing
    flops: Optional[float] = None  # per call
    baseline: bool = False  # the eager column that ratios are taken against
    params: Dict[str, object] = field(default_factory=dict)  # shape of the size (B, K, ..., dtype, threads, device)
    alloc_bytes: Optional[int] = None  # bytes allocated per call (profiler), where measured
    note: str = ""
    sampling: Dict[str, object] = field(default_factory=dict)  # how the size's columns were sampled (shared)

    @property
    def median_us(self) -> float:
        return self.timing.median * 1e6

    @property
    def gflops(self) -> Optional[float]:
        return None if not self.flops else self.flops / self.timing.median / 1e9


@dataclass
class Column:
    """A column to measure: its label, the callable, whether it is the baseline, FLOPs per call, a note."""

    label: str
    fn: Callable[[], object]
    baseline: bool = False
    flops: Optional[float] = None
    note: str = ""
    alloc: bool = True  # measure bytes allocated per call (when the suite asks for memory)


def run_params(params: Dict[str, object], device: str, dtype=torch.float32) -> Dict[str, object]:
    """``params`` plus the dtype, the thread count and the device of this run."""
    out = dict(params)
    out.setdefault("dtype", _dtypes.name(dtype))
    out.setdefault("threads", torch.get_num_threads())
    out.setdefault("device", str(device))
    return out


def shape_label(params: Dict[str, object], run: bool = True) -> str:
    """"B=1 K=32 D=16 hidden=64x64 ctx=32, float32, 2 threads, cpu" from a case's params (without
    the dtype, threads and device when ``run`` is False)."""
    dims = []
    for k, v in params.items():
        if k in _RUN_KEYS or (k == "batch" and "B" in params):
            continue
        if isinstance(v, (list, tuple)):
            v = "x".join(str(e) for e in v) if v else "()"
        dims.append(f"{_SHORT.get(k, k)}={v}")
    if not run:
        return " ".join(dims)
    rest = []
    if "dtype" in params:
        rest.append(str(params["dtype"]))
    if "threads" in params:
        rest.append(f"{params['threads']} thread{'s' if params['threads'] != 1 else ''}")
    if "device" in params:
        rest.append(str(params["device"]))
    return ", ".join([" ".join(dims)] + rest if dims else rest)


def measure_cases(suite: str, size: str, columns: Sequence[Column], params: Dict[str, object], device: str = "cpu",
                  timing: Optional[Dict[str, object]] = None, memory: bool = False,
                  progress: Optional[Callable[[str], None]] = None) -> List[Case]:
    """Times ``columns`` together (interleaved, adaptive: ``timing`` are measure_interleaved's options) and
    returns one Case per column, the group's sampling record shared by all of them."""
    if progress:
        progress(f"{suite} {size} ({len(columns)} columns, interleaved)")
    base = [i for i, c in enumerate(columns) if c.baseline]
    r = measure_interleaved([(c.label, c.fn) for c in columns], baseline=base[0] if base else None, device=device,
                            **(timing or {}))
    sampling = r.sampling()
    sampling["precision"] = r.precision
    p = run_params(params, device)
    out = []
    for c in columns:
        alloc = None
        if memory and c.alloc:
            from pyebm.bench.memory import alloc_per_call

            alloc = alloc_per_call(c.fn, device)
        out.append(Case(suite, size, c.label, r.timings[c.label], flops=c.flops, baseline=c.baseline, params=p,
                        alloc_bytes=alloc, note=c.note, sampling=sampling))
    return out


def _fmt(v, spec) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _ratio_fmt(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


class BenchResult:
    """A list of cases plus the machine they ran on. Prints as a table; converts to dict / JSON / CSV."""

    def __init__(self, cases: List[Case], meta: Optional[Dict[str, object]] = None,
                 confidence: float = stats.CONFIDENCE, max_ci_factor: float = stats.MAX_CI_FACTOR,
                 spread_warn: float = stats.SPREAD_WARN):
        self.cases = list(cases)
        self.meta = meta or machine_info()
        self.confidence = confidence
        self.max_ci_factor = max_ci_factor
        self.spread_warn = spread_warn
        self._rows: Optional[Tuple[int, List[Dict[str, object]]]] = None  # (len(cases) when computed, rows)

    # -- derived figures ---------------------------------------------------------------------------
    def _group(self, case: Case):
        return [c for c in self.cases if c.suite == case.suite and c.size == case.size]

    def _baseline(self, case: Case) -> Optional[Case]:
        base = [c for c in self._group(case) if c.baseline]
        return base[0] if base else None

    def vs_baseline(self, case: Case) -> Optional[float]:
        """median(baseline) / median(case): the "x eager" point estimate (whether or not it is printed)."""
        base = self._baseline(case)
        return base.timing.median / case.timing.median if base else None

    def ratio_ci(self, case: Case) -> Tuple[Optional[Tuple[float, float]], bool]:
        """(interval of median(baseline) / median(case), whether it was paired); (None, False) without one."""
        base = self._baseline(case)
        if base is None:
            return None, False
        if base is case:
            return (1.0, 1.0), True
        paired = base.timing.interleaved and case.timing.interleaved and base.sampling is case.sampling \
            and base.sampling is not None and len(base.sampling) > 0
        ci = stats.bootstrap_ratio_ci(base.timing.samples, case.timing.samples, paired=paired,
                                      confidence=self.confidence)
        return ci, paired

    def pct_gemm(self, case: Case) -> Optional[float]:
        gemm = [c for c in self._group(case) if c.column == GEMM_COLUMN]
        if not gemm or not case.flops or not gemm[0].flops:
            return None
        return 100.0 * (case.flops / case.timing.median) / (gemm[0].flops / gemm[0].timing.median)

    def _host_warnings(self, case: Case) -> List[str]:
        s = case.sampling or {}
        if not s.get("host_before") and not s.get("host_after"):
            return []
        return host_warnings(s.get("host_before"), s.get("host_after"), threads=case.params.get("threads"),
                             cores=self.meta.get("usable_cores"))

    def rows(self) -> List[Dict[str, object]]:
        if self._rows is not None and self._rows[0] == len(self.cases):
            return self._rows[1]
        out = []
        host_cache: Dict[int, List[str]] = {}
        for c in self.cases:
            s = stats.summary(c.timing.samples)
            point = self.vs_baseline(c)
            ci, paired = self.ratio_ci(c)
            warnings: List[str] = []
            status = None
            shown = point
            if point is not None and not c.baseline:
                factor = stats.ci_factor(ci)
                if ci is None:
                    status = "no interval"
                    nb = self._baseline(c).timing.n
                    warnings.append(f"x eager has no interval (an interval needs 2 samples of each side; this column "
                                    f"has {s['n']}, the baseline {nb})")
                elif factor > self.max_ci_factor:
                    status, shown = "noisy", None
                    warnings.append(f"x eager not printed: its {self.confidence:.0%} interval {ci[0]:.3g}-{ci[1]:.3g} "
                                    f"spans {factor:.1f}x (more than {self.max_ci_factor:g}x)")
                else:
                    status = "ok"
                    target = (c.sampling or {}).get("rel_ci_target")
                    hw = stats.rel_half_width(ci, point)
                    if target and hw > target:
                        warnings.append(f"x eager known to +-{hw:.1%} only (target +-{target:.0%}; sampling stopped "
                                        f"by {c.sampling.get('stop')} after {c.sampling.get('rounds')} rounds)")
            if s["n"] >= 2 and s["spread"] > self.spread_warn:
                warnings.append(f"spread: IQR is {s['spread']:.0%} of the median (warning above "
                                f"{self.spread_warn:.0%})")
            key = id(c.sampling)
            if key not in host_cache:
                host_cache[key] = self._host_warnings(c)
            warnings += host_cache[key]
            out.append({
                "suite": c.suite, "size": c.size, "shape": shape_label(c.params), "column": c.column,
                "median_us": s["median"] * 1e6, "q25_us": s["q25"] * 1e6, "q75_us": s["q75"] * 1e6,
                "iqr_us": s["iqr"] * 1e6, "min_us": s["min"] * 1e6, "max_us": s["max"] * 1e6, "p90_us": s["p90"] * 1e6,
                "n": s["n"], "spread": s["spread"] if math.isfinite(s["spread"]) else None,
                "vs_eager": shown, "vs_eager_estimate": point, "vs_eager_ci": list(ci) if ci else None,
                "vs_eager_paired": paired if point is not None else None, "vs_eager_status": status,
                "gflops": c.gflops, "pct_gemm": self.pct_gemm(c), "alloc_bytes": c.alloc_bytes, "note": c.note,
                "params": c.params, "warnings": warnings,
            })
        self._rows = (len(self.cases), out)
        return out

    def warnings(self) -> List[Dict[str, str]]:
        """Every warning once: {suite, size, column (None for the host's), message}."""
        out, seen = [], set()
        for r, c in zip(self.rows(), self.cases):
            host = set(self._host_warnings(c))
            for w in r["warnings"]:
                col = None if w in host else r["column"]
                key = (r["suite"], r["size"], col, w)
                if key not in seen:
                    seen.add(key)
                    out.append({"suite": r["suite"], "size": r["size"], "column": col, "message": w})
        return out

    def _suite_sampling(self) -> Dict[str, Dict[str, object]]:
        """Per suite: how its sizes were sampled (the settings of its first size with several columns)."""
        out: Dict[str, Dict[str, object]] = {}
        for c in self.cases:
            s = c.sampling or {}
            if c.suite in out and out[c.suite].get("interleaved"):
                continue
            if s.get("min_samples") is None:
                out[c.suite] = {"interleaved": False, "adaptive": False, "stop": s.get("stop")}
            else:
                out[c.suite] = {"interleaved": bool(s.get("interleaved")), "adaptive": True,
                                **{k: s.get(k) for k in ("min_samples", "max_samples", "budget_s", "rel_ci_target")}}
        return out

    def method(self) -> Dict[str, object]:
        """How the figures were obtained (the JSON's "method", the legend under the table)."""
        per_suite = self._suite_sampling()
        return {
            "statistic": "median of per-call times; IQR = q25..q75 (linear interpolation)",
            "interleaved": any(v.get("interleaved") for v in per_suite.values()),
            "interleaving": "the columns of one size are sampled round-robin: sample 1 of every column, then "
                            "sample 2, ...; sample i of all columns saw the same host state",
            "sampling": per_suite,
            "ratio": "x eager = median(baseline) / median(column)",
            "ratio_interval": f"{self.confidence:.0%} percentile bootstrap, {stats.RESAMPLES} resamples, seed "
                              f"{stats.SEED}, paired by round when interleaved",
            "refuse_ratio_above_ci_factor": self.max_ci_factor,
            "spread_warning_above": self.spread_warn,
        }

    def to_dict(self) -> Dict[str, object]:
        rows = [dict(r) for r in self.rows()]
        for r, c in zip(rows, self.cases):
            r["samples_s"] = list(c.timing.samples)
            r["calls_per_sample"] = c.timing.calls_per_sample
            r["interleaved"] = c.timing.interleaved
            r["flops"] = c.flops
            r["sampling"] = c.sampling
        return {"meta": self.meta, "method": self.method(), "warnings": self.warnings(), "rows": rows}

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str)

    CSV_FIELDS = ("suite", "size", "shape", "column", "median_us", "q25_us", "q75_us", "min_us", "p90_us", "n",
                  "vs_eager", "vs_eager_ci_lo", "vs_eager_ci_hi", "vs_eager_status", "gflops", "pct_gemm",
                  "alloc_bytes", "note", "warnings")

    def to_csv(self, path: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows():
                ci = r["vs_eager_ci"] or (None, None)
                w.writerow({**r, "vs_eager_ci_lo": ci[0], "vs_eager_ci_hi": ci[1], "warnings": "; ".join(r["warnings"])})

    # -- renderings ----------------------------------------------------------------------------------
    HEADERS = ("suite", "size", "shape", "column", "median us", "IQR us", "min us", "p90 us", "n",
               "x eager [95% CI]", "GFLOP/s", "% GEMM", "alloc/call", "!")
    _LEFT = 4  # left-aligned leading columns

    def _footnotes(self) -> Tuple[Dict[Tuple[str, str, Optional[str], str], int], List[str]]:
        nums, lines = {}, []
        for w in self.warnings():
            key = (w["suite"], w["size"], w["column"], w["message"])
            nums[key] = len(nums) + 1
            where = f"{w['suite']} {w['size']}" + (f", {w['column']}" if w["column"] else " (every column)")
            lines.append(f"[{nums[key]}] {where}: {w['message']}")
        return nums, lines

    def _cells(self, r, nums, first: bool = True, shape: Optional[str] = None) -> List[str]:
        """A row's cells; the host's warnings (shared by a size's columns) are marked on its first row only."""
        alloc = r["alloc_bytes"]
        alloc_s = "-" if alloc is None else (f"{alloc / 2**20:.2f} MiB" if alloc >= 2**20 else f"{alloc / 1024:.1f} KiB")
        if r["vs_eager_status"] == "noisy":
            ratio = "noisy"
        elif r["vs_eager"] is None:
            ratio = "-"
        elif r["vs_eager_ci"] and r["vs_eager_status"] == "ok":
            lo, hi = r["vs_eager_ci"]
            ratio = f"{_ratio_fmt(r['vs_eager'])} [{_ratio_fmt(lo)}, {_ratio_fmt(hi)}]"
        else:
            ratio = _ratio_fmt(r["vs_eager"])
        marks = []
        for (suite, size, col, msg), i in nums.items():
            if suite == r["suite"] and size == r["size"] and msg in r["warnings"] and \
                    (col == r["column"] or (col is None and first)):
                marks.append(f"[{i}]")
        iqr = f"{_fmt(r['q25_us'], '.1f')}-{_fmt(r['q75_us'], '.1f')}" if r["n"] >= 2 else "-"
        return [r["suite"], r["size"], r["shape"] if shape is None else shape, r["column"] + (f" ({r['note']})" if r["note"] else ""),
                _fmt(r["median_us"], ".1f"), iqr, _fmt(r["min_us"], ".1f"), _fmt(r["p90_us"], ".1f"), str(r["n"]),
                ratio, _fmt(r["gflops"], ".2f"), _fmt(r["pct_gemm"], ".0f"), alloc_s, "".join(marks)]

    def legend(self) -> str:
        """What the statistics in the table are (printed under it)."""
        m = self.method()
        lines = []
        if m["interleaved"]:
            lines.append("Columns of each size sampled round-robin (interleaved: sample 1 of every column, then "
                         "sample 2, ...), so host load hits every column alike.")
        for suite, a in m["sampling"].items():
            if not a.get("adaptive"):
                lines.append(f"{suite}: columns timed one after another ({a.get('stop') or 'fixed repeats'}); "
                             f"intervals, where any, are not paired.")
                continue
            tgt = a.get("rel_ci_target")
            until = f"until every ratio's interval is within +-{tgt:.0%} or" if tgt else "until"
            lines.append(f"{suite}: {a.get('min_samples')} to {a.get('max_samples')} samples per column, {until} "
                         f"{a.get('budget_s'):g} s of sampling per size are spent.")
        if any(w["column"] is None for w in self.warnings()):
            lines.append("The host was busy during this run (warnings above): load slows the columns unequally, so "
                         "even ratios with tight intervals may be off. Rerun on a quiet machine before quoting them.")
        lines.append(f"median, IQR (q25-q75), min, p90 per call; n = samples. x eager = median(baseline) / "
                     f"median(column) [{self.confidence:.0%} bootstrap interval, {stats.RESAMPLES} resamples, seed "
                     f"{stats.SEED}, paired by round]; \"noisy\" = interval spans more than "
                     f"{self.max_ci_factor:g}x, not printed.")
        return "\n".join(lines)

    def header(self) -> str:
        m = self.meta
        gpu = f", {m.get('gpu')} (driver {m.get('gpu_driver')})" if m.get("gpu") else ""
        dirty = " (modified)" if m.get("dirty") else ""
        gov = f", governor {m.get('governor')}" if m.get("governor") else ""
        return (f"{m.get('cpu_model') or m.get('processor')}, kernels {m.get('cpu_isa')}, {m.get('usable_cores')} cores, "
                f"{m.get('threads')} threads{gov}{gpu}; torch {m.get('torch')}, triton "
                f"{m.get('triton')}, pyebm {m.get('pyebm')}, commit {m.get('commit')}{dirty}; {m.get('date')}")

    def markdown(self) -> str:
        nums, notes = self._footnotes()
        lines = ["| " + " | ".join(self.HEADERS) + " |",
                 "|" + "---|" * self._LEFT + "---:|" * (len(self.HEADERS) - self._LEFT - 1) + "---|"]
        last = None
        for r in self.rows():
            key = (r["suite"], r["size"])
            lines.append("| " + " | ".join(self._cells(r, nums, first=key != last)) + " |")
            last = key
        if notes:
            lines.append("")
            lines.append("Warnings:")
            lines += notes
        return "\n".join(lines)

    __str__ = markdown

    def print_rich(self) -> None:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            print(self.header())
            print(self.markdown())
            print(self.legend())
            return
        nums, notes = self._footnotes()
        # dtype, threads and device in the title when every row shares them; the rows keep the dimensions
        runs = {tuple(c.params.get(k) for k in _RUN_KEYS) for c in self.cases}
        common = shape_label({k: v for k, v in zip(_RUN_KEYS, runs.pop()) if v is not None}) if len(runs) == 1 else None
        table = Table(title=f"pyebm bench - {self.header()}" + (f"\nevery row: {common}" if common else ""))
        for i, h in enumerate(self.HEADERS):
            table.add_column(h, justify="left" if i < self._LEFT or i == len(self.HEADERS) - 1 else "right",
                             overflow="fold")
        last = None
        for r, c in zip(self.rows(), self.cases):
            key = (r["suite"], r["size"])
            if last is not None and key != last:
                table.add_section()
            cells = self._cells(r, nums, first=key != last, shape=shape_label(c.params, run=False) if common else None)
            last = key
            style = None
            if r["vs_eager_status"] == "noisy":
                style = "yellow"
            elif (r["vs_eager"] or 0) >= 1.0 and not r["column"].startswith(("eager", GEMM_COLUMN)) and not r["warnings"]:
                style = "bold green"
            table.add_row(*cells, style=style)
        console = Console()
        if not console.is_terminal:  # files and pipes: wide enough that no cell is cut
            console = Console(width=max(console.width, 240))
        console.print(table)
        for n in notes:
            console.print(n, style="yellow", highlight=False, markup=False)
        console.print(self.legend(), style="dim", highlight=False, markup=False)

    def plot(self, path: str) -> None:
        """Per suite with a batch sweep: latency against batch size (median, IQR error bars), one line per
        column, and below it each column's speed-up over eager with its interval."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        suites = sorted({c.suite for c in self.cases if "batch" in c.params})
        if not suites:
            raise ValueError("plot: no case has a 'batch' parameter (run a suite with a batch sweep)")
        fig, axes = plt.subplots(2, len(suites), figsize=(7 * len(suites), 8.5), squeeze=False, sharex="col",
                                 gridspec_kw={"height_ratios": [3, 2]})
        rows = self.rows()
        for j, suite in enumerate(suites):
            ax, ax2 = axes[0][j], axes[1][j]
            cols: Dict[str, List] = {}
            fixed: Optional[Dict[str, object]] = None
            baselines = set()
            for r, c in zip(rows, self.cases):
                if c.suite != suite or "batch" not in c.params:
                    continue
                if c.baseline:
                    baselines.add(c.column)
                cols.setdefault(c.column, []).append((c.params["batch"], r))
                p = {k: v for k, v in c.params.items() if k not in ("batch", "B")}
                fixed = p if fixed is None else {k: v for k, v in fixed.items() if p.get(k) == v}
            for col, pts in cols.items():
                pts.sort(key=lambda p: p[0])
                xs = [p[0] for p in pts]
                med = [p[1]["median_us"] for p in pts]
                err = [[m - p[1]["q25_us"] for m, p in zip(med, pts)], [p[1]["q75_us"] - m for m, p in zip(med, pts)]]
                line = ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=col)
                if col.startswith("eager") or col == GEMM_COLUMN or col in baselines:
                    continue
                rx, ry, rerr = [], [], [[], []]
                for x, p in zip(xs, [p[1] for p in pts]):
                    if p["vs_eager_estimate"] is None:
                        continue
                    rx.append(x)
                    ry.append(p["vs_eager_estimate"])
                    lo, hi = p["vs_eager_ci"] or (ry[-1], ry[-1])
                    rerr[0].append(max(0.0, ry[-1] - lo))
                    rerr[1].append(max(0.0, hi - ry[-1]))
                if rx:
                    ax2.errorbar(rx, ry, yerr=rerr, marker="o", capsize=3, label=col, color=line[0].get_color())
            ax.set_title(f"{suite}: batch B varies; {shape_label(fixed or {})}", fontsize=9)
            batches = sorted({p[0] for pts in cols.values() for p in pts})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_ylabel("median latency per call (us), IQR bars")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            ax2.axhline(1.0, color="grey", lw=1, ls="--")
            ax2.set_xscale("log", base=2)
            ax2.set_xticks(batches, [str(b) for b in batches])
            ax2.set_xlabel("batch size B (contexts)")
            ax2.set_ylabel(f"speed-up over eager ({self.confidence:.0%} CI)")
            ax2.grid(True, which="both", alpha=0.3)
            if ax2.get_legend_handles_labels()[0]:
                ax2.legend(fontsize=7)
        import textwrap

        fig.suptitle(textwrap.fill(self.header(), 60 + 50 * len(suites)), fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

