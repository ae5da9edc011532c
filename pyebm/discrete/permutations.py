"""Argmin of linear energies over permutations, and Sinkhorn's soft version.

Sign convention: theta are scores (higher is better), the energy is their negation, and the argmin
maximises the score.

Permutahedron (ranking), theta [B, k]: the states are the permutations y of a vector w (default
w = (1, 2, ..., k)), E(y) = -<theta, y>. The argmin gives the largest w to the largest score
(rearrangement inequality): exact by sorting. ``perm[b, i]`` is item i's position in ascending order of
theta (0-based rank), and y = sort(w)[perm].

Birkhoff polytope (assignment), theta [B, k, k]: the states are permutation matrices P (P[i, perm[i]] = 1),
E(P) = -<theta, P> = -sum_i theta[i, perm[i]]. The argmin is the maximum-weight assignment: exact by
``scipy.optimize.linear_sum_assignment`` on the CPU (method "scipy", the default on every device: a CUDA
theta is copied to the host, solved row by row of the batch, and the permutations copied back), or by a
batched auction on theta's own device (method "auction": every problem of the batch bids in parallel,
epsilon-scaling; the result is within k * eps of the optimum, and exact when the optimum beats every other
assignment by more than that).

``sinkhorn(theta, tau)`` is the entropy-regularised version over the Birkhoff polytope: the doubly
stochastic P maximising <theta, P> + tau * H(P), computed in the log domain; as tau -> 0 it tends to the
permutation matrix of the assignment above.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

METHODS = ("auto", "sort", "scipy", "auction")


@dataclass
class PermutationResult:
    """What ``permutation_argmin`` found.

    perm    [B, k] int64 (or [k] unbatched). Permutahedron: item i's 0-based rank in ascending order of
            theta. Birkhoff: the column assigned to row i.
    energy  [B] (or []): E at perm, computed from perm and theta.
    exact   True for "sort" and "scipy"; False for "auction" (within ``gap_bound`` of the optimum).
    gap_bound [B] or None: for "auction", k * eps: the optimum is at least energy - gap_bound.
    """

    perm: Tensor
    energy: Tensor
    exact: bool
    gap_bound: Optional[Tensor] = None

    def matrix(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The permutation matrices [B, k, k] (P[i, perm[i]] = 1)."""
        k = self.perm.shape[-1]
        return torch.nn.functional.one_hot(self.perm, k).to(dtype or torch.get_default_dtype())


def _check_theta(theta, where: str) -> Tuple[Tensor, bool, str]:
    """theta batched ([B, k] or [B, k, k]), whether it was unbatched, and the polytope."""
    if not isinstance(theta, Tensor):
        raise TypeError(f"{where}: theta must be a floating tensor [B, k] (permutahedron) or [B, k, k] "
                        f"(Birkhoff); got {type(theta).__name__}")
    if not theta.is_floating_point() or theta.is_complex():
        raise TypeError(f"{where}: theta must be a real floating tensor; got {theta.dtype}")
    if theta.dim() == 1:
        theta, unbatched = theta.unsqueeze(0), True
    elif theta.dim() in (2, 3):
        unbatched = False
    else:
        raise ValueError(f"{where}: theta must be [k] or [B, k] (permutahedron) or [B, k, k] (Birkhoff; one "
                         f"problem as [1, k, k]); got shape {list(theta.shape)}")
    polytope = "permutahedron" if theta.dim() == 2 else "birkhoff"
    if theta.shape[-1] == 0:
        raise ValueError(f"{where}: theta has k = 0 items (shape {list(theta.shape)}); need k >= 1")
    if polytope == "birkhoff" and theta.shape[1] != theta.shape[2]:
        raise ValueError(f"{where}: a Birkhoff theta must be square [B, k, k]; got shape {list(theta.shape)}")
    _check_finite(theta, where)
    return theta, unbatched, polytope


def _check_finite(theta: Tensor, where: str) -> None:
    # A finite sum means finite entries (a NaN or an infinity makes the sum NaN or infinite): one vectorised
    # pass and one host read. Only a sum that is not finite, which finite entries can also give by overflowing,
    # needs the check of every entry.
    if math.isfinite(theta.detach().sum()):
        return
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"{where}: theta contains NaN or Inf")


def _check_w(w, theta: Tensor, where: str) -> Tensor:
    """w sorted ascending, as [B, k]."""
    B, k = theta.shape
    if w is None:
        return torch.arange(1, k + 1, dtype=theta.dtype, device=theta.device).expand(B, k)
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise TypeError(f"{where}: w must be a floating tensor [k] or [B, k], or None")
    if w.shape == (k,):
        w = w.expand(B, k)
    elif tuple(w.shape) != (B, k):
        raise ValueError(f"{where}: w must be [k] = {[k]} or [B, k] = {[B, k]}; got {list(w.shape)}")
    return torch.sort(w.to(device=theta.device, dtype=theta.dtype), dim=1).values


def _check_perm(perm, B: int, k: int, device, where: str) -> Tensor:
    if not isinstance(perm, Tensor) or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise TypeError(f"{where}: perm must be an integer tensor [B, k]; got "
                        f"{perm.dtype if isinstance(perm, Tensor) else type(perm).__name__}")
    if tuple(perm.shape) != (B, k):
        raise ValueError(f"{where}: perm must be [B, k] = {[B, k]} (theta's); got {list(perm.shape)}")
    perm = perm.to(device=device, dtype=torch.int64)
    ok = torch.equal(torch.sort(perm, dim=1).values, torch.arange(k, device=device).expand(B, k))
    if not ok:
        raise ValueError(f"{where}: perm is not a permutation: every row must hold each of 0..{k - 1} exactly once")
    return perm


def _energy(perm: Tensor, theta: Tensor, polytope: str, w_sorted: Optional[Tensor]) -> Tensor:
    if polytope == "permutahedron":
        return -(theta * torch.gather(w_sorted, 1, perm)).sum(1)
    return -torch.gather(theta, 2, perm.unsqueeze(2)).squeeze(2).sum(1)


def permutation_energy(perm: Tensor, theta: Tensor, w: Optional[Tensor] = None) -> Tensor:
    """E(perm) = -<theta, y> (permutahedron, theta [B, k]; y = sort(w)[perm]) or -sum_i theta[i, perm[i]]
    (Birkhoff, theta [B, k, k]): [B], or [] for an unbatched [k] theta. perm must be a permutation of
    0..k-1 in every row (ValueError otherwise)."""
    where = "permutation_energy"
    theta2, unbatched, polytope = _check_theta(theta, where)
    B, k = theta2.shape[:2]
    if unbatched and isinstance(perm, Tensor) and perm.dim() == 1:
        perm = perm.unsqueeze(0)
    perm = _check_perm(perm, B, k, theta2.device, where)
    if polytope == "birkhoff" and w is not None:
        raise ValueError(f"{where}: w applies to the permutahedron (theta [B, k]) only")
    w_sorted = _check_w(w, theta2, where) if polytope == "permutahedron" else None
    E = _energy(perm, theta2, polytope, w_sorted)
    return E[0] if unbatched else E


def permutation_argmin(theta: Tensor, w: Optional[Tensor] = None, *, method: str = "auto",
                       eps: Optional[float] = None, max_rounds: int = 1_000_000) -> PermutationResult:
    """The permutation of lowest linear energy, batched over B (see the module docstring for the conventions).

    theta   [B, k] or [k]: permutahedron (E = -<theta, y>, y a permutation of w); [B, k, k]: Birkhoff
            (E = -sum_i theta[i, perm[i]]; one problem as [1, k, k]).
    w       permutahedron only: the vector whose permutations are the states ([k] or [B, k]; default 1..k).
    method  "auto": "sort" for the permutahedron, "scipy" for Birkhoff. "sort": exact, on theta's device
            (ties: the lower index gets the lower rank). "scipy": exact (scipy's linear_sum_assignment, one
            call per problem on the CPU; a CUDA theta makes one copy to the host and one back). "auction":
            batched auction on theta's device in float64 (see below).
    eps     "auction": the final bid increment per problem, as a fraction of theta's range (max - min) of that
            problem; default 1e-9 / k. The result is within k * eps * range of the optimum (``gap_bound``).
    max_rounds "auction": bidding rounds at most (all phases); RuntimeError beyond it.

    The auction (Bertsekas' forward auction with epsilon scaling, every unassigned row of every problem
    bidding at once) reads one bool from the device per bidding round, never per problem.
    """
    where = "permutation_argmin"
    theta2, unbatched, polytope = _check_theta(theta, where)
    if method not in METHODS:
        raise ValueError(f"{where}: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}")
    if method == "auto":
        method = "sort" if polytope == "permutahedron" else "scipy"
    if polytope == "permutahedron":
        if method != "sort":
            raise ValueError(f"{where}: method={method!r} solves assignments (theta [B, k, k]); the permutahedron "
                             "(theta [B, k]) is solved exactly by method='sort'")
        w_sorted = _check_w(w, theta2, where)
        order = torch.sort(theta2, dim=1, stable=True).indices              # ascending
        perm = torch.empty_like(order).scatter_(1, order, torch.arange(theta2.shape[1], device=theta2.device)
                                                .expand_as(order).contiguous())
        res = PermutationResult(perm, _energy(perm, theta2, polytope, w_sorted), True)
    else:
        if w is not None:
            raise ValueError(f"{where}: w applies to the permutahedron (theta [B, k]) only")
        if method == "sort":
            raise ValueError(f"{where}: method='sort' solves the permutahedron (theta [B, k]); an assignment "
                             "(theta [B, k, k]) needs 'scipy' or 'auction'")
        if theta2.shape[0] == 0:
            perm = torch.empty(0, theta2.shape[1], dtype=torch.int64, device=theta2.device)
            res = PermutationResult(perm, theta2.new_empty(0), method == "scipy")
        elif method == "scipy":
            perm = _scipy_assignment(theta2)
            res = PermutationResult(perm, _energy(perm, theta2, polytope, None), True)
        else:
            perm, bound = _auction(theta2, eps, max_rounds, where)
            res = PermutationResult(perm, _energy(perm, theta2, polytope, None), False, bound.to(theta2.dtype))
    if unbatched:
        res = PermutationResult(res.perm[0], res.energy[0], res.exact, None)
    return res


_LSA = []  # scipy's linear_sum_assignment once imported (a function, not state)


def _linear_sum_assignment():
    if not _LSA:
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError as exc:  # pragma: no cover - scipy is in the test and discrete extras
            raise ImportError("permutation_argmin(method='scipy') needs scipy: pip install 'pyebm[discrete]' "
                              "(or pip install scipy), or use method='auction'") from exc
        _LSA.append(linear_sum_assignment)
    return _LSA[0]


def _host_costs(theta: Tensor) -> np.ndarray:
    """-theta as a fresh C-contiguous float64 numpy array [B, k, k] (a cast copy, negated in place).

    scipy's ``maximize=True`` negates a copy of every matrix before minimising, so minimising -theta gives
    the same assignment (negation is exact) without the per-problem copy. A CPU float32 / float64 / float16
    theta is read through a numpy view of its own storage (any strides); other dtypes and devices are
    copied to the host in float64 first."""
    if theta.device.type == "cpu" and theta.dtype in (torch.float32, torch.float64, torch.float16):
        try:
            src = (theta.detach() if theta.requires_grad else theta).numpy()
        except (RuntimeError, TypeError):  # a view numpy cannot share (e.g. a negative-bit view)
            src = None
        if src is not None:
            host = src.astype(np.float64, order="C")  # a copy, also of a float64 theta (astype copies)
            np.negative(host, out=host)
            return host
    # theta on another device (negated there, one copy to the host), or of a dtype numpy lacks
    return theta.detach().neg().to("cpu", torch.float64, memory_format=torch.contiguous_format).numpy()


def _scipy_assignment(theta: Tensor) -> Tensor:
    """Maximum-weight assignment of every problem by scipy (exact), on the CPU; perm [B, k] int64 on theta's
    device."""
    B, k = theta.shape[:2]
    cost = _host_costs(theta)
    lsa = _linear_sum_assignment()
    # A square problem's row indices are 0..k-1 in order (scipy's documented contract): its column indices
    # are the permutation. One concatenation for the batch, no per-problem tensor op.
    perm = torch.from_numpy(np.concatenate([cols for _, cols in map(lsa, cost)]).reshape(B, k))
    return perm if theta.device.type == "cpu" else perm.to(theta.device)


def _auction(theta: Tensor, eps: Optional[float], max_rounds: int, where: str) -> Tuple[Tensor, Tensor]:
    """Batched forward auction with epsilon scaling (maximisation). Returns (perm [B, k], gap bound [B]).

    Each unassigned row i bids for its best column j1 (value theta[i, j] - price[j]) and raises that price by
    the margin over its second-best column plus eps; each column goes to its highest bidder (ties: the lower
    row), whose previous owner becomes unassigned. When every row is assigned the assignment is eps-optimal
    (within k * eps of the optimum); eps shrinks by a factor 8 per phase down to the final eps, prices kept."""
    B, k, _ = theta.shape
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, numbers.Integral) or max_rounds < 1:
        raise ValueError(f"{where}: max_rounds must be an int >= 1; got {max_rounds!r}")
    if eps is None:
        eps = 1e-9 / k
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 < eps < math.inf):
        raise ValueError(f"{where}: eps must be a number > 0; got {eps!r}")
    th = theta.detach().to(torch.float64)
    dev = th.device
    span = (th.amax(dim=(1, 2)) - th.amin(dim=(1, 2)))                        # [B]
    # a zero range: every assignment is optimal; a floor keeps the bids moving in float64
    floor = 64 * torch.finfo(torch.float64).eps * th.abs().amax(dim=(1, 2)).clamp(min=1.0)
    eps_final = torch.maximum(span * float(eps), floor)
    eps_cur = torch.maximum(span / 8, eps_final)
    price = torch.zeros(B, k, dtype=torch.float64, device=dev)
    rows = torch.arange(k, device=dev).expand(B, k)
    if k == 1:
        return torch.zeros(B, 1, dtype=torch.int64, device=dev), torch.zeros(B, dtype=torch.float64, device=dev)
    rounds = 0
    while True:
        owner = torch.full((B, k), -1, dtype=torch.int64, device=dev)       # column -> row
        assigned = torch.full((B, k), -1, dtype=torch.int64, device=dev)    # row -> column
        while True:
            free = assigned < 0
            if not bool(free.any()):  # one host read per round, all problems together
                break
            rounds += 1
            if rounds > max_rounds:
                raise RuntimeError(f"{where}: the auction did not finish in max_rounds = {max_rounds} bidding rounds; "
                                   "raise max_rounds or eps, or use method='scipy'")
            values = th - price.unsqueeze(1)                                  # [B, rows, cols]
            top = values.topk(2, dim=2)
            j1 = top.indices[..., 0]
            bid = price.gather(1, j1) + (top.values[..., 0] - top.values[..., 1]) + eps_cur.unsqueeze(1)
            bid = torch.where(free, bid, torch.full_like(bid, -math.inf))
            best = torch.full((B, k), -math.inf, dtype=torch.float64, device=dev).scatter_reduce(
                1, j1, bid, reduce="amax", include_self=True)                # highest bid per column
            wins = free & (bid == best.gather(1, j1))
            winner = torch.full((B, k), k, dtype=torch.int64, device=dev).scatter_reduce(
                1, j1, torch.where(wins, rows, torch.full_like(rows, k)), reduce="amin", include_self=True)
            got = winner < k                                                  # columns that changed hands
            owner = torch.where(got, winner, owner)
            price = torch.where(got, best, price)
            # row -> column from column -> row (unowned columns write to a spare slot)
            slot = torch.where(owner >= 0, owner, torch.full_like(owner, k))
            assigned = torch.full((B, k + 1), -1, dtype=torch.int64, device=dev).scatter_(
                1, slot, rows.expand(B, k).contiguous())[:, :k]
        if bool((eps_cur <= eps_final).all()):
            return assigned, k * eps_final
        eps_cur = torch.maximum(eps_cur / 8, eps_final)


def sinkhorn(theta: Tensor, tau: float = 1.0, iters: int = 100, *, log: bool = False) -> Tensor:
    """Soft assignment: the doubly stochastic P [..., k, k] maximising <theta, P> + tau * H(P) (H the entropy),
    approximated by ``iters`` Sinkhorn iterations in the log domain (each: normalise rows, then columns, by
    logsumexp), starting from log P = theta / tau. Batched over any leading dimensions.

    After the final column normalisation the columns sum to 1 exactly (up to rounding) and the rows to within
    the iteration's convergence. tau -> 0 tends to the permutation matrix of
    ``permutation_argmin(theta, method="scipy")`` (where that optimum is unique). ``log=True`` returns log P."""
    where = "sinkhorn"
    if not isinstance(theta, Tensor) or not theta.is_floating_point() or theta.is_complex():
        raise TypeError(f"{where}: theta must be a real floating tensor [..., k, k]; got "
                        f"{theta.dtype if isinstance(theta, Tensor) else type(theta).__name__}")
    if theta.dim() < 2 or theta.shape[-1] != theta.shape[-2]:
        raise ValueError(f"{where}: theta must be square in its last two dimensions [..., k, k]; got "
                         f"{list(theta.shape)}")
    if theta.shape[-1] == 0:
        raise ValueError(f"{where}: theta has k = 0 items; need k >= 1")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not (0 < tau < math.inf):
        raise ValueError(f"{where}: tau must be a number > 0; got {tau!r}")
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"{where}: iters must be an int >= 1; got {iters!r}")
    if not bool(torch.isfinite(theta).all()):
        raise ValueError(f"{where}: theta contains NaN or Inf")
    logp = theta / tau
    for _ in range(int(iters)):
        logp = logp - torch.logsumexp(logp, dim=-1, keepdim=True)
        logp = logp - torch.logsumexp(logp, dim=-2, keepdim=True)
    return logp if log else logp.exp()
