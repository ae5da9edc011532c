"""Statistics of latency samples: order statistics, bootstrap confidence intervals of ratios of medians,
and the reliability rules that decide when a ratio may be printed.

Samples of one column are per-call seconds. Columns of one size are sampled round-robin (sample 1 of every
column, then sample 2, ...), so sample i of every column saw the same host state; the interval of a ratio
to the baseline then resamples *pairs* (the same round indices for both columns), which keeps that shared
load out of the interval. Runs measured at different times (``pyebm bench compare``) share nothing, and
their medians are resampled independently.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

CONFIDENCE = 0.95  # level of every interval
RESAMPLES = 2000  # bootstrap resamples of a reported interval
SEED = 0  # fixed: the same samples give the same interval
REL_CI_TARGET = 0.05  # adaptive sampling stops once every ratio is known to +-5% (relative half-width)
MAX_CI_FACTOR = 2.0  # an "x eager" whose interval spans more than this factor (hi / lo) is not printed
SPREAD_WARN = 0.10  # a column whose IQR exceeds 10% of its median gets a warning


def quantile(samples: Sequence[float], q: float) -> float:
    """The q-quantile with linear interpolation between order statistics (numpy's default, R type 7)."""
    if len(samples) == 0:
        raise ValueError("quantile: no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile: q must be in [0, 1]; got {q}")
    s = sorted(samples)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(samples: Sequence[float]) -> Dict[str, float]:
    """median, q25, q75, iqr, min, max, p90, n and spread (IQR / median) of ``samples``."""
    med = quantile(samples, 0.5)
    q25, q75 = quantile(samples, 0.25), quantile(samples, 0.75)
    return {"median": med, "q25": q25, "q75": q75, "iqr": q75 - q25, "min": min(samples), "max": max(samples),
            "p90": quantile(samples, 0.9), "n": len(samples),
            "spread": (q75 - q25) / med if med > 0 else float("inf")}


def _check_level(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")


def bootstrap_median_ci(samples: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                        seed: int = SEED) -> Optional[Tuple[float, float]]:
    """Percentile-bootstrap interval of the median; None with fewer than 2 samples."""
    _check_level(confidence)
    x = np.asarray(samples, dtype=np.float64)
    if x.size < 2:
        return None
    rng = np.random.default_rng(seed)
    meds = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(meds, [a, 1.0 - a])
    return float(lo), float(hi)


def bootstrap_ratio_ci(num: Sequence[float], den: Sequence[float], paired: bool = True,
                       confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = SEED) -> Optional[Tuple[float, float]]:
    """Percentile-bootstrap interval of median(num) / median(den).

    ``paired``: num[i] and den[i] were taken in the same round (interleaved sampling); each resample draws
    one set of round indices for both, and only the first min(len) rounds are used. Otherwise the two are
    resampled independently. None when either side has fewer than 2 samples."""
    _check_level(confidence)
    a_ = np.asarray(num, dtype=np.float64)
    b_ = np.asarray(den, dtype=np.float64)
    if a_.size < 2 or b_.size < 2:
        return None
    rng = np.random.default_rng(seed)
    if paired:
        n = min(a_.size, b_.size)
        idx = rng.integers(0, n, size=(resamples, n))
        ra = np.median(a_[:n][idx], axis=1)
        rb = np.median(b_[:n][idx], axis=1)
    else:
        ra = np.median(a_[rng.integers(0, a_.size, size=(resamples, a_.size))], axis=1)
        rb = np.median(b_[rng.integers(0, b_.size, size=(resamples, b_.size))], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = ra / rb
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return float(lo), float(hi)


def ratio_of_medians(num: Sequence[float], den: Sequence[float], paired: bool = True) -> float:
    """median(num) / median(den), over the first min(len) samples of both when ``paired``."""
    if paired:
        n = min(len(num), len(den))
        num, den = list(num)[:n], list(den)[:n]
    d = quantile(den, 0.5)
    return quantile(num, 0.5) / d if d > 0 else float("inf")


def rel_half_width(ci: Optional[Tuple[float, float]], point: float) -> float:
    """(hi - lo) / 2 / point; infinite without an interval."""
    if ci is None or not point or not math.isfinite(point):
        return float("inf")
    return (ci[1] - ci[0]) / 2.0 / abs(point)


def ci_factor(ci: Optional[Tuple[float, float]]) -> float:
    """hi / lo of a positive interval: how many-fold the interval spans (1 = a point)."""
    if ci is None:
        return float("inf")
    lo, hi = ci
    if lo <= 0 or not math.isfinite(hi):
        return float("inf")
    return hi / lo


def iqr_overlap(a: Dict[str, float], b: Dict[str, float]) -> bool:
    """Whether the [q25, q75] ranges of two summaries overlap."""
    return a["q25"] <= b["q75"] and b["q25"] <= a["q75"]
