"""Comparing two benchmark runs, and the local history of saved runs.

``compare(old, new)`` matches rows by (suite, size, column) and gives, per row, the change of the median
and whether it is beyond noise. The rule: a change is beyond noise when the 95% bootstrap interval of
median(new) / median(old) excludes 1 (the two runs resampled independently: they were measured at
different times and share no host state) AND the two runs' IQRs do not overlap. The interval alone
shrinks with the sample count and would flag the drift of a shared host between two runs; the IQR test
alone ignores how many samples there are. Both must agree.

Saved runs live in ``.benchmarks/pyebm/`` under the current directory (``PYEBM_BENCH_STORAGE`` moves
it), numbered like pytest-benchmark's: ``0001_NAME.json``, ``0002_NAME.json``, ...
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Dict, List, Optional, Tuple

from pyebm.bench import stats

RULE = ("beyond noise = the 95% bootstrap interval of median(new)/median(old) excludes 1 (runs resampled "
        "independently, 2000 resamples, seed 0) and the IQRs of the two runs do not overlap")


def storage_dir() -> str:
    return os.environ.get("PYEBM_BENCH_STORAGE") or os.path.join(os.getcwd(), ".benchmarks", "pyebm")


def load(path: str) -> Dict[str, object]:
    """A run's JSON (``pyebm bench --json``), checked for the fields compare needs."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read benchmark file {path!r}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path!r} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path!r} is not a pyebm bench result (expected a JSON object with a 'rows' list)")
    for i, r in enumerate(data["rows"]):
        missing = [k for k in ("suite", "size", "column") if k not in r]
        if missing or not (r.get("samples_s") or r.get("median_us") is not None):
            raise ValueError(f"{path!r}: row {i} lacks {missing or ['samples_s']} (not a pyebm bench result)")
    return data


_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def save(result_dict: Dict[str, object], name: str, folder: Optional[str] = None) -> str:
    """Writes a run as ``NNNN_NAME.json`` (the next number) in the history folder; returns the path."""
    if not _NAME_OK.match(name or ""):
        raise ValueError(f"--save NAME: use letters, digits, '.', '_' and '-' (starting with a letter or digit); "
                         f"got {name!r}")
    folder = folder or storage_dir()
    os.makedirs(folder, exist_ok=True)
    nums = [int(m.group(1)) for m in (re.match(r"^(\d{4,})_", f) for f in os.listdir(folder)) if m]
    path = os.path.join(folder, f"{(max(nums) + 1 if nums else 1):04d}_{name}.json")
    with open(path, "w") as f:
        json.dump(result_dict, f, indent=1, default=str)
    return path


def saved_runs(folder: Optional[str] = None) -> List[str]:
    """Saved runs, oldest first."""
    folder = folder or storage_dir()
    if not os.path.isdir(folder):
        return []
    files = [f for f in os.listdir(folder) if re.match(r"^\d{4,}_.+\.json$", f)]
    return [os.path.join(folder, f) for f in sorted(files, key=lambda f: int(f.split("_", 1)[0]))]


def resolve(ref: str, folder: Optional[str] = None) -> str:
    """A run's path from a file path, "latest", a saved run's NAME (its latest save) or its number."""
    if os.path.isfile(ref):
        return ref
    runs = saved_runs(folder)
    where = folder or storage_dir()
    if ref == "latest":
        if not runs:
            raise ValueError(f"no saved runs in {where!r} (save one with --save NAME)")
        return runs[-1]
    for path in reversed(runs):
        base = os.path.basename(path)[:-len(".json")]
        num, _, name = base.partition("_")
        if ref in (name, base) or (ref.isdigit() and int(ref) == int(num)):
            return path
    known = ", ".join(os.path.basename(p) for p in runs) or "none"
    raise ValueError(f"{ref!r} is neither a file nor a saved run in {where!r} (saved: {known})")


def _summary(row: Dict[str, object]) -> Dict[str, float]:
    if row.get("samples_s"):
        return stats.summary(row["samples_s"])
    m = row["median_us"] * 1e-6
    q25 = (row.get("q25_us") or row["median_us"]) * 1e-6
    q75 = (row.get("q75_us") or row["median_us"]) * 1e-6
    return {"median": m, "q25": q25, "q75": q75, "n": row.get("n") or 1}


def _key(row) -> Tuple[str, str, str]:
    return (row["suite"], row["size"], row["column"])


def compare(old: Dict[str, object], new: Dict[str, object], confidence: float = stats.CONFIDENCE) -> List[Dict[str, object]]:
    """One entry per row present in either run (see the module docstring for the rule)."""
    old_rows = {_key(r): r for r in old["rows"]}
    new_rows = {_key(r): r for r in new["rows"]}
    keys = list(old_rows) + [k for k in new_rows if k not in old_rows]
    out = []
    for k in keys:
        o, n = old_rows.get(k), new_rows.get(k)
        entry: Dict[str, object] = {"suite": k[0], "size": k[1], "column": k[2],
                                    "shape": (n or o).get("shape", ""), "old_median_us": None, "new_median_us": None,
                                    "change": None, "ratio_ci": None, "iqr_overlap": None, "verdict": None,
                                    "old_vs_eager": o.get("vs_eager") if o else None,
                                    "new_vs_eager": n.get("vs_eager") if n else None}
        if o is None or n is None:
            entry["verdict"] = "only in new" if o is None else "only in old"
            out.append(entry)
            continue
        so, sn = _summary(o), _summary(n)
        ratio = sn["median"] / so["median"] if so["median"] > 0 else float("inf")
        ci = None
        if o.get("samples_s") and n.get("samples_s"):
            ci = stats.bootstrap_ratio_ci(n["samples_s"], o["samples_s"], paired=False, confidence=confidence)
        overlap = stats.iqr_overlap(so, sn)
        if ci is None:
            verdict = "no interval"
        elif (ci[0] > 1.0 or ci[1] < 1.0) and not overlap:
            verdict = "slower" if ratio > 1.0 else "faster"
        else:
            verdict = "within noise"
        entry.update({"old_median_us": so["median"] * 1e6, "new_median_us": sn["median"] * 1e6, "change": ratio - 1.0,
                      "ratio_ci": list(ci) if ci else None, "iqr_overlap": overlap, "verdict": verdict,
                      "old_n": so["n"], "new_n": sn["n"]})
        out.append(entry)
    return out


HEADERS = ("suite", "size", "column", "old median us", "new median us", "change", "new/old [95% CI]", "IQRs overlap",
           "verdict", "x eager old -> new")


def _cells(e) -> List[str]:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    ci = e["ratio_ci"]
    ratio = "-" if e["change"] is None else f"{1 + e['change']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    ov = "-" if e["iqr_overlap"] is None else ("yes" if e["iqr_overlap"] else "no")
    xe = f"{f(e['old_vs_eager'], '.2f')} -> {f(e['new_vs_eager'], '.2f')}"
    return [e["suite"], e["size"], e["column"], f(e["old_median_us"], ".1f"), f(e["new_median_us"], ".1f"),
            "-" if e["change"] is None else f"{e['change']:+.1%}", ratio, ov, e["verdict"], xe]


def markdown(entries: List[Dict[str, object]], old_name: str = "old", new_name: str = "new") -> str:
    lines = [f"Comparing {old_name} (old) with {new_name} (new). {RULE}.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * 3 + "---:|" * 5 + "---|---:|"]
    for e in entries:
        lines.append("| " + " | ".join(_cells(e)) + " |")
    counts: Dict[str, int] = {}
    for e in entries:
        counts[e["verdict"]] = counts.get(e["verdict"], 0) + 1
    lines += ["", "Rows: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    return "\n".join(lines)


def print_rich(entries: List[Dict[str, object]], old_name: str, new_name: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(entries, old_name, new_name))
        return
    table = Table(title=f"pyebm bench compare: {old_name} -> {new_name}")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 3 or h == "verdict" else "right", overflow="fold")
    style = {"faster": "bold green", "slower": "bold red"}
    for e in entries:
        table.add_row(*_cells(e), style=style.get(e["verdict"]))
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 180))
    console.print(table)
    console.print(RULE + ".", style="dim", highlight=False, markup=False)


CSV_FIELDS = ("suite", "size", "shape", "column", "old_median_us", "new_median_us", "change", "ratio_ci_lo", "ratio_ci_hi",
              "iqr_overlap", "verdict", "old_vs_eager", "new_vs_eager")


def to_csv(entries: List[Dict[str, object]], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for e in entries:
            ci = e["ratio_ci"] or (None, None)
            w.writerow({**e, "ratio_ci_lo": ci[0], "ratio_ci_hi": ci[1]})
