"""`pyebm bench rerank` and `pyebm bench assign`: verification of N proposals, and the assignment solver.

rerank: an MLPEnergy (context 32, candidate D=16, hidden 256x256, silu) scores N proposals for each of B
contexts and keeps the top k=4 (lowest energy). Sizes N = 64, 256, 1024, 4096 at B = 4 (--quick: N = 64,
256), plus a batch sweep B = 1, 4, 16, 64 at N = 256 for --plot (--quick: B = 1, 4, 16, and only with
--plot). Columns:
  eager loop        one forward per context and candidate under no_grad, as users write it (the baseline);
                    its top-k indices are checked against pyebm.rerank's at set-up (the note says so)
  batched forward   one plain forward of the module on all B x N candidates, then top-k
  pyebm.rerank      context prepared once, the fused energy op, top-k and the softmax distribution
                    (temperature 1) on the device
  same-FLOP GEMM    a GEMM of the candidate-side forward's FLOP count, timed in the same run
The eager loop's allocations are not measured (thousands of small calls: the profiler would dominate).

assign: maximum-weight assignment of B random [k, k] score matrices (float32 inputs, uniform on [0, 1)),
k = 8, 32, 128, 256 and B = 1, 64, 1024 (--quick: k = 8, 32 and B = 1, 64). The combination k=256,
B=1024 is left out: one call of the scipy loop alone takes about 6 s there on a 2-core EPYC (k=128,
B=1024 takes about 0.8 s). Columns:
  scipy loop                  a Python loop of scipy.optimize.linear_sum_assignment(maximize=True) on the
                              float64 numpy copy of theta (the baseline; numpy's allocations are not seen
                              by the allocation measurement, so its alloc/call is left out)
  permutation_argmin scipy    pyebm.discrete.permutation_argmin(method="scipy"): the same solver, plus the
                              copies and the energy
  permutation_argmin auction  method="auction", batched on theta's device in float64; the note gives the
                              largest energy gap to scipy's optimum found at set-up. On the CPU it is left
                              out where B * k * k > 2**15 (one call takes from about a second up there:
                              0.5-3 s at k=32, B=64 and 15 s at k=128, B=64 on a 2-core EPYC); a line on
                              stderr says so
The rows at k=32 carry the batch size for --plot (latency against B at k = 32).
The columns of a size are sampled together, round-robin (pyebm.bench.timing.measure_interleaved).
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from pyebm.bench.core import GEMM_COLUMN, Case, Column, measure_cases
from pyebm.bench.suites import _timing_kw, mlp_flops, register_suite
from pyebm.bench.timing import gemm_reference

RERANK_N = (64, 256, 1024, 4096)
RERANK_QUICK_N = (64, 256)
RERANK_B = 4
RERANK_TOP_K = 4
RERANK_SWEEP = (1, 4, 16, 64)  # batch sizes of the plot sweep, at N = RERANK_SWEEP_N
RERANK_QUICK_SWEEP = (1, 4, 16)
RERANK_SWEEP_N = 256
# The energy: (context_dim, D, hidden)
RERANK_MODEL = (32, 16, (256, 256))

ASSIGN_K = (8, 32, 128, 256)
ASSIGN_B = (1, 64, 1024)
ASSIGN_QUICK_K = (8, 32)
ASSIGN_QUICK_B = (1, 64)
ASSIGN_SKIP = ((256, 1024),)  # (k, B): one scipy loop call would take well over 2 s
ASSIGN_PLOT_K = 32  # rows at this k carry "batch" (the --plot axis)
AUCTION_CPU_MAX = 1 << 15  # B * k * k above which the CPU auction column is left out


def eager_rerank(energy, x: torch.Tensor, y: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The eager loop: one forward per context and candidate; returns (energies [B, k], index [B, k]),
    lowest energy first."""
    B, N = y.shape[:2]
    with torch.no_grad():
        E = torch.stack([torch.stack([energy(x[b:b + 1], y[b:b + 1, n])[0] for n in range(N)])
                         for b in range(B)]).reshape(B, N)
    neg, index = torch.topk(-E, k, dim=1)
    return -neg, index


def batched_rerank(energy, x: torch.Tensor, y: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One plain forward of the module on all B x N candidates; returns (energies [B, k], index [B, k])."""
    with torch.no_grad():
        neg, index = torch.topk(-energy(x, y), k, dim=1)
    return -neg, index


def scipy_assign_loop(theta: torch.Tensor) -> List[Tuple[object, object]]:
    """A Python loop of scipy's linear_sum_assignment (maximize=True) over theta [B, k, k], on the float64
    host copy; returns scipy's (rows, cols) per problem."""
    from scipy.optimize import linear_sum_assignment

    host = theta.detach().cpu().double().numpy()
    return [linear_sum_assignment(host[b], maximize=True) for b in range(host.shape[0])]


def _calls(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _positive_ints(name: str, values, where: str) -> List[int]:
    out = list(values)
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in out):
        raise ValueError(f"{where}: {name} must be a non-empty sequence of ints >= 1; got {values!r}")
    return out


def assign_grid(quick: bool = False, ks: Optional[Sequence[int]] = None,
                Bs: Optional[Sequence[int]] = None) -> List[Tuple[int, int]]:
    """The (k, B) pairs assign_cases measures: ``ks`` x ``Bs`` (defaults ASSIGN_K x ASSIGN_B less
    ASSIGN_SKIP; quick ASSIGN_QUICK_K x ASSIGN_QUICK_B); a grid given explicitly is run whole."""
    explicit = ks is not None or Bs is not None
    ks = _positive_ints("ks", ks if ks is not None else (ASSIGN_QUICK_K if quick else ASSIGN_K), "assign_cases")
    Bs = _positive_ints("Bs", Bs if Bs is not None else (ASSIGN_QUICK_B if quick else ASSIGN_B), "assign_cases")
    return [(k, B) for k in ks for B in Bs if explicit or (k, B) not in ASSIGN_SKIP]


def rerank_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
                 Ns: Optional[Sequence[int]] = None, B: Optional[int] = None, sweep: bool = True,
                 progress: Optional[Callable[[str], None]] = None,
                 sampling: Optional[Dict[str, object]] = None) -> Iterator[Case]:
    """``pyebm.rerank`` of N proposals against the eager loop and a batched forward (module docstring).

    ``Ns`` proposals per context (default RERANK_N; quick RERANK_QUICK_N), ``B`` contexts (default 4),
    ``sweep`` adds the batch sweep at N = 256 (RERANK_SWEEP; quick RERANK_QUICK_SWEEP). ``compile`` is
    accepted for the CLI and unused (no torch.compile column)."""
    import pyebm

    Ns = _positive_ints("Ns", Ns if Ns is not None else (RERANK_QUICK_N if quick else RERANK_N), "rerank_cases")
    B = RERANK_B if B is None else _positive_ints("B", [B], "rerank_cases")[0]
    kw = _timing_kw(quick, sampling)
    cdim, D, hidden = RERANK_MODEL
    plan = [(f"N={N}", B, N, None) for N in Ns]
    if sweep:
        plan += [(f"sweep B={b}", b, RERANK_SWEEP_N, b) for b in (RERANK_QUICK_SWEEP if quick else RERANK_SWEEP)]
    torch.manual_seed(0)
    energy = pyebm.MLPEnergy(cdim, D, hidden=hidden, activation="silu").to(device)
    for name, B_, N, batch in plan:
        torch.manual_seed(1)
        x = torch.randn(B_, cdim, device=device)
        y = torch.randn(B_, N, D, device=device)
        k = min(RERANK_TOP_K, N)
        flops = mlp_flops(B_ * N, D, hidden, grad=False)
        params = {"B": B_, "N": N, "k": k, "D": D, "hidden": list(hidden), "context_dim": cdim}
        if batch is not None:
            params["batch"] = batch

        def fused(x=x, y=y, k=k):
            return pyebm.rerank(energy, x, y, k=k, temperature=1.0)

        same = torch.equal(eager_rerank(energy, x, y, k)[1], fused().index)
        cols = [Column("eager loop", (lambda x=x, y=y, k=k: eager_rerank(energy, x, y, k)), baseline=True,
                       flops=flops, alloc=False, note=_calls(B_ * N, "forward call")),
                Column("batched forward", (lambda x=x, y=y, k=k: batched_rerank(energy, x, y, k)), flops=flops),
                Column("pyebm.rerank", fused, flops=flops,
                       note="same top-k as the eager loop" if same else "TOP-K DIFFERS from the eager loop")]
        gemm = gemm_reference(flops, B_ * N, device=device)
        cols.append(Column(GEMM_COLUMN, gemm, flops=gemm.flops, alloc=False))
        yield from measure_cases("rerank", name, cols, params, device=device, timing=kw,
                                 memory=memory and batch is None, progress=progress)


def assign_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
                 ks: Optional[Sequence[int]] = None, Bs: Optional[Sequence[int]] = None, sweep: bool = True,
                 progress: Optional[Callable[[str], None]] = None,
                 sampling: Optional[Dict[str, object]] = None) -> Iterator[Case]:
    """``permutation_argmin`` (scipy, auction) against a loop of scipy's solver (module docstring).

    ``ks`` problem sizes and ``Bs`` batch sizes: the grid of ``assign_grid``. ``compile`` and ``sweep`` are
    accepted for the CLI and unused (the grid is the sweep)."""
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise SystemExit("pyebm bench assign: needs scipy (pip install 'pyebm[discrete]')") from None
    from pyebm.discrete import permutation_argmin

    grid = assign_grid(quick, ks, Bs)
    kw = _timing_kw(quick, sampling)
    plot_k = ASSIGN_PLOT_K if any(k == ASSIGN_PLOT_K for k, _ in grid) else grid[0][0]
    for k, B in grid:
        torch.manual_seed(0)
        theta = torch.rand(B, k, k, device=device)
        params = {"B": B, "k": k}
        if k == plot_k:
            params["batch"] = B
        cols = [Column("scipy loop", (lambda theta=theta: scipy_assign_loop(theta)), baseline=True, alloc=False,
                       note=_calls(B, "solver call")),
                Column("permutation_argmin scipy", (lambda theta=theta: permutation_argmin(theta, method="scipy")))]
        if device.startswith("cuda") or B * k * k <= AUCTION_CPU_MAX:
            exact = permutation_argmin(theta, method="scipy").energy
            gap = (permutation_argmin(theta, method="auction").energy - exact).max().item()
            cols.append(Column("permutation_argmin auction",
                               (lambda theta=theta: permutation_argmin(theta, method="auction")),
                               note=f"energy gap to scipy {gap:.1e}"))
        else:
            print(f"assign k={k} B={B}: auction column left out on the CPU (B*k*k = {B * k * k} > "
                  f"{AUCTION_CPU_MAX}: seconds per call)", file=sys.stderr)
        yield from measure_cases("assign", f"k={k} B={B}", cols, params, device=device, timing=kw, memory=memory,
                                 progress=progress)


register_suite("rerank", rerank_cases)
register_suite("assign", assign_cases)
