"""Argmin of energies over sets: y in {0, 1}^L (multilabel), batched over B.

Sign convention: u are scores (higher is better), the energy is their negation, and the argmin maximises the
score:

    unary     E(y) = -<u, y>
    pairwise  E(y) = -<u, y> - 1/2 <y, U y>      (Ising-type; only the symmetric part (U + U^T) / 2 matters)

``set_argmin`` is exact for unary energies (with or without a cardinality constraint) and a local method for
pairwise ones (projected gradient on the relaxation, rounding, then local search until no move lowers E):
without a constraint the relaxation is [0, 1]^L and the moves are single flips; with exactly k labels it is
{z in [0, 1]^L : sum z = k} and the moves are swaps (one label in, one out); with at most k labels it is
{z in [0, 1]^L : sum z <= k} and the moves are swaps, single additions (below k labels) and single removals.
The result is a local minimum for its move set, not always the global one.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass
class SetResult:
    """What ``set_argmin`` found (batched like ``u``: [B, L] / [B], or [L] / [] for one unbatched problem).

    y       the chosen set as a 0/1 tensor in ``u``'s dtype.
    energy  E(y), computed from y (not accumulated).
    exact   True when y is a global minimiser by construction (unary energies), False for the local search.
    flips   [B] int64: moves the local search made (pairwise energies: single flips, or with k the swaps,
            additions and removals, each counted once), else None.
    """

    y: Tensor
    energy: Tensor
    exact: bool
    flips: Optional[Tensor] = None


def _check_scores(u, where: str) -> Tuple[Tensor, bool]:
    """u as [B, L] and whether it was unbatched."""
    if not isinstance(u, Tensor):
        raise TypeError(f"{where}: u must be a floating tensor [B, L] or [L]; got {type(u).__name__}")
    if not u.is_floating_point() or u.is_complex():
        raise TypeError(f"{where}: u must be a real floating tensor; got {u.dtype}")
    if u.dim() not in (1, 2):
        raise ValueError(f"{where}: u must be [B, L] or [L]; got shape {list(u.shape)}")
    unbatched = u.dim() == 1
    u = u.unsqueeze(0) if unbatched else u
    if u.shape[1] == 0:
        raise ValueError(f"{where}: u has L = 0 labels (shape {list(u.shape)}); need L >= 1")
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"{where}: u contains NaN or Inf")
    return u, unbatched


def _check_pairwise(U, u: Tensor, unbatched: bool, where: str) -> Tensor:
    """U as the symmetric [B, L, L] in u's dtype and device."""
    B, L = u.shape
    if not isinstance(U, Tensor):
        raise TypeError(f"{where}: U must be a floating tensor [B, L, L] or [L, L], or None; got {type(U).__name__}")
    if not U.is_floating_point() or U.is_complex():
        raise TypeError(f"{where}: U must be a real floating tensor; got {U.dtype}")
    if U.dtype != u.dtype or U.device != u.device:
        raise ValueError(f"{where}: U is {U.dtype} on {U.device} but u is {u.dtype} on {u.device}")
    if U.dim() == 2 and tuple(U.shape) == (L, L):
        U = U.unsqueeze(0).expand(B, L, L)
    elif tuple(U.shape) != (B, L, L):
        expected = f"[L, L] = {[L, L]}" if unbatched else f"[B, L, L] = {[B, L, L]} or [L, L] = {[L, L]}"
        raise ValueError(f"{where}: U must be {expected} (u is {list(u.shape[1:] if unbatched else u.shape)}); "
                         f"got {list(U.shape)}")
    if not bool(torch.isfinite(U).all()):
        raise ValueError(f"{where}: U contains NaN or Inf")
    return 0.5 * (U + U.transpose(1, 2))


def _check_binary(name: str, y, u: Tensor, unbatched: bool, where: str) -> Tensor:
    """y as [B, L] 0/1 in u's dtype; a clear error for anything that is not a set."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{where}: {name} must be a tensor of 0/1 values; got {type(y).__name__}")
    if y.is_complex():
        raise TypeError(f"{where}: {name} must be real 0/1 values; got {y.dtype}")
    if unbatched and y.dim() == 1:
        y = y.unsqueeze(0)
    if tuple(y.shape) != tuple(u.shape):
        raise ValueError(f"{where}: {name} must have the shape of u {list(u.shape[1:] if unbatched else u.shape)}; "
                         f"got {list(y.shape)}")
    y = y.to(device=u.device)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{where}: {name} must be binary (every entry 0 or 1); it has other values")
    return y.to(u.dtype)


def _energy(y: Tensor, u: Tensor, Us: Optional[Tensor]) -> Tensor:
    E = -(u * y).sum(-1)
    if Us is not None:
        E = E - 0.5 * (y * torch.bmm(Us, y.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return E


def set_energy(y: Tensor, u: Tensor, U: Optional[Tensor] = None) -> Tensor:
    """E(y) = -<u, y> (- 1/2 <y, U y> with U) of sets y in {0, 1}^L: [B] for y, u [B, L]; [] for [L].

    y may be bool, integer or floating, but every entry must be 0 or 1 (ValueError otherwise)."""
    u2, unbatched = _check_scores(u, "set_energy")
    y2 = _check_binary("y", y, u2, unbatched, "set_energy")
    Us = None if U is None else _check_pairwise(U, u2, unbatched, "set_energy")
    E = _energy(y2, u2, Us)
    return E[0] if unbatched else E


def _int_arg(name: str, value, lo: int, hi: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise ValueError(f"{where}: {name} must be an int in [{lo}, {hi}]; got {value!r}")
    return int(value)


def set_argmin(u: Tensor, U: Optional[Tensor] = None, *, k: Optional[int] = None, at_most: bool = False,
               init: Optional[Tensor] = None, steps: int = 100, step_size: Optional[float] = None,
               max_rounds: Optional[int] = None) -> SetResult:
    """The set y in {0, 1}^L of lowest energy E(y) = -<u, y> (- 1/2 <y, U y>), batched over B.

    u       scores [B, L] (or [L] for one problem).
    U       pairwise couplings [B, L, L] or [L, L] (shared by the batch), or None for unary energies. Only
            (U + U^T) / 2 matters; its diagonal acts like extra unary scores (y_i^2 = y_i).
    k       the cardinality constraint, an int in [0, L] shared by the batch: exactly k labels, or at most k
            with ``at_most=True`` (which needs k).

    Unary energies (exact):
      k None      y_i = 1 where u_i > 0 (entries with u_i = 0 stay out: the smallest of the minimisers).
      k given     exactly k labels: the k largest scores, whatever their sign (ties: lower index first).
      at_most     with k: at most k labels: the k largest scores, keeping only the positive ones.

    Pairwise energies (local, ``exact=False``): ``steps`` projected-gradient steps on a relaxation of the
    feasible sets (step 1 / ||(U + U^T)/2||_F unless ``step_size``), a rounding to a feasible set, then a
    steepest-descent local search: each round applies, in every problem where it helps, the single move that
    lowers E most, until no move lowers E by more than rounding error. Every move lowers E, so no set comes
    back and the search ends. ``max_rounds`` (None: no limit) stops it earlier: a problem with
    ``flips < max_rounds`` stopped at a local optimum; one with ``flips == max_rounds`` may not have.

      k None      relaxation z in [0, 1]^L from z = 1/2, rounded at 1/2; moves: flip one label. The result is
                  1-flip optimal: no single flip lowers its energy.
      k given     relaxation {z in [0, 1]^L : sum z = k} from z = k / L (exact Euclidean projection:
                  z = clamp(v - tau, 0, 1) with the shift tau found from the sorted breakpoints of v); rounded
                  to the k largest z (ties: lower index first); moves: swap one label in the set for one
                  outside it. The result is swap optimal among the sets of exactly k labels.
      at_most     relaxation {z in [0, 1]^L : sum z <= k} from z = min(1/2, k / L) (the box projection when
                  its sum is <= k, else the projection above); rounded to the lowest-energy prefix (0 to k
                  labels) of the labels ordered by z, largest first; moves: swaps, adding one label (while the
                  set has fewer than k) and removing one. The result is optimal for all three moves.

    ``init`` (0/1, shaped like u) skips the relaxation and starts the local search from it; with k it must be
    feasible (exactly k labels, or at most k with ``at_most``), else a ValueError: it is not projected. The
    search reads one bool from the device per round (all problems together); with k each round forms the
    energy change of every swap in closed form, a [B, L, L] tensor.
    """
    where = "set_argmin"
    u2, unbatched = _check_scores(u, where)
    B, L = u2.shape
    if at_most is not True and at_most is not False:
        raise TypeError(f"{where}: at_most must be True or False; got {at_most!r}")
    if k is not None:
        k = _int_arg("k", k, 0, L, where)
    elif at_most:
        raise ValueError(f"{where}: at_most=True needs k (the largest set size)")
    if U is None:
        if init is not None:
            raise ValueError(f"{where}: init is the start of the pairwise local search; unary energies are "
                             "solved exactly without one")
        y = _unary_argmin(u2, k, at_most)
        E = _energy(y, u2, None)
        return _finish(SetResult(y, E, True), unbatched)
    Us = _check_pairwise(U, u2, unbatched, where)
    if max_rounds is not None:
        max_rounds = _int_arg("max_rounds", max_rounds, 0, 2 ** 62, where)
    if init is not None:
        y = _check_binary("init", init, u2, unbatched, where).clone()
        if k is not None:
            _check_init_size(y, k, at_most, where)
    else:
        steps = _int_arg("steps", steps, 0, 10 ** 9, where)
        if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, numbers.Real)
                                      or not step_size > 0):
            raise ValueError(f"{where}: step_size must be a number > 0 or None; got {step_size!r}")
        if k is None:
            y = _relax_and_round(u2, Us, steps, step_size)
        else:
            y = _relax_and_round_k(u2, Us, k, at_most, steps, step_size)
    if k is None:
        y, flips = _local_search(y, u2, Us, max_rounds)
    else:
        y, flips = _local_search_k(y, u2, Us, k, at_most, max_rounds)
    return _finish(SetResult(y, _energy(y, u2, Us), False, flips), unbatched)


def _check_init_size(y: Tensor, k: int, at_most: bool, where: str) -> None:
    """A clear error for a start that breaks the cardinality constraint (one host read)."""
    n = (y != 0).sum(dim=1)
    bad = (n > k) if at_most else (n != k)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        need = f"at most k = {k}" if at_most else f"exactly k = {k}"
        raise ValueError(f"{where}: init must be a feasible set ({need} labels); problem {b} has {int(n[b])}")


def _finish(res: SetResult, unbatched: bool) -> SetResult:
    if unbatched:
        return SetResult(res.y[0], res.energy[0], res.exact, None if res.flips is None else res.flips[0])
    return res


def _unary_argmin(u: Tensor, k: Optional[int], at_most: bool) -> Tensor:
    if k is None:
        return (u > 0).to(u.dtype)
    order = torch.sort(u, dim=1, descending=True, stable=True).indices[:, :k]
    y = torch.zeros_like(u).scatter_(1, order, 1.0)
    if at_most:
        y = y * (u > 0).to(u.dtype)
    return y


def _relax_and_round(u: Tensor, Us: Tensor, steps: int, step_size: Optional[float]) -> Tensor:
    """Projected gradient on z in [0, 1]^L for f(z) = -<u, z> - 1/2 <z, Us z>, then rounding at 1/2.

    The gradient of f is Lipschitz with constant ||Us||_2 <= ||Us||_F, so 1 / ||Us||_F is a safe step (a
    zero Us gives an infinite step: the projection then thresholds u, the exact unary answer)."""
    z = torch.full_like(u, 0.5)
    if step_size is None:
        lip = torch.linalg.matrix_norm(Us, ord="fro")                       # [B]
        eta = (1.0 / lip).clamp(max=torch.finfo(u.dtype).max).unsqueeze(1)  # inf -> the largest finite step
    else:
        eta = torch.full((u.shape[0], 1), float(step_size), dtype=u.dtype, device=u.device)
    for _ in range(steps):
        grad = -u - torch.bmm(Us, z.unsqueeze(-1)).squeeze(-1)
        z = (z - eta * grad).clamp_(0.0, 1.0)
    return (z > 0.5).to(u.dtype)


def _project_capped_simplex(v: Tensor, k: int) -> Tensor:
    """Euclidean projection of every row of v [B, L] onto {z in [0, 1]^L : sum z = k} (0 <= k <= L).

    By the KKT conditions the projection is clamp(v - tau, 0, 1) for a shift tau with g(tau) = k, where
    g(t) = sum_i clamp(v_i - t, 0, 1) is continuous, nonincreasing and linear between consecutive points of
    the 2L breakpoints {v_i - 1, v_i}. A batched binary search over the sorted breakpoints (a fixed number
    of halvings, no host read) finds the segment where g crosses k, with g(first breakpoint) = L and
    g(last) = 0; tau is then the linear interpolation on that segment, exact up to rounding. Each g is a sum
    of terms in [0, 1], so it carries no cancellation whatever the scale of v."""
    B, L = v.shape
    t = torch.sort(torch.cat([v - 1.0, v], dim=1), dim=1).values          # [B, 2L] breakpoints

    def g(at: Tensor) -> Tensor:                                            # at [B, 1] -> [B, 1]
        return (v - at).clamp(0.0, 1.0).sum(dim=1, keepdim=True)

    lo = torch.zeros(B, 1, dtype=torch.int64, device=v.device)
    hi = torch.full((B, 1), 2 * L - 1, dtype=torch.int64, device=v.device)
    for _ in range(max(1, (2 * L - 1).bit_length())):                      # hi - lo halves each time
        mid = (lo + hi) // 2
        above = g(t.gather(1, mid)) >= k
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    t_lo, t_hi = t.gather(1, lo), t.gather(1, hi)
    g_lo, g_hi = g(t_lo), g(t_hi)
    span = g_lo - g_hi
    frac = torch.where(span > 0, (g_lo - k) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(span)).clamp(0.0, 1.0)
    tau = t_lo + frac * (t_hi - t_lo)
    return (v - tau).clamp(0.0, 1.0)


def _project_k(v: Tensor, k: int, at_most: bool) -> Tensor:
    """Projection onto {z in [0, 1]^L : sum z = k}, or with ``at_most`` onto {... : sum z <= k}: the box
    projection where its sum is at most k (the multiplier of the sum is 0), else the sum = k projection (the
    constraint is active)."""
    if not at_most:
        return _project_capped_simplex(v, k)
    box = v.clamp(0.0, 1.0)
    return torch.where(box.sum(dim=1, keepdim=True) <= k, box, _project_capped_simplex(v, k))


def _relax_and_round_k(u: Tensor, Us: Tensor, k: int, at_most: bool, steps: int,
                       step_size: Optional[float]) -> Tensor:
    """Projected gradient for f(z) = -<u, z> - 1/2 <z, Us z> on the relaxation of the sets of exactly k
    (``at_most``: at most k) labels, then rounding to a feasible set.

    The step is 1 / ||Us||_F (see ``_relax_and_round``), but at most 1 / (sqrt(eps) max_i |u_i|): with a
    (nearly) zero Us the relaxation is linear, and that step already moves the iterate to the top-k vertex
    up to score gaps of sqrt(eps) while keeping v = z - eta grad far below the float range, where the
    breakpoints v_i - 1 and v_i would no longer differ.

    Rounding: exactly k: the k largest z (ties: lower index first). At most k: of the k largest z, the
    prefix (0 to k labels, in order of z) of lowest energy, the shortest one on ties."""
    B, L = u.shape
    z = torch.full_like(u, min(0.5, k / L) if at_most else k / L)           # feasible start
    if step_size is None:
        lip = torch.linalg.matrix_norm(Us, ord="fro")                       # [B]
        floor = math.sqrt(torch.finfo(u.dtype).eps) * u.abs().amax(dim=1)
        eta = 1.0 / torch.maximum(lip, floor).clamp(min=torch.finfo(u.dtype).tiny)
        eta = eta.unsqueeze(1)
    else:
        eta = torch.full((B, 1), float(step_size), dtype=u.dtype, device=u.device)
    for _ in range(steps):
        grad = -u - torch.bmm(Us, z.unsqueeze(-1)).squeeze(-1)
        z = _project_k(z - eta * grad, k, at_most)
    order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]   # [B, k]
    if not at_most:
        return torch.zeros_like(u).scatter_(1, order, 1.0)
    # E of the prefixes: adding the m-th label of the order to the first m changes E by
    #   -u_m - sum_{l < m} Us_ml - 1/2 Us_mm
    uo = u.gather(1, order)
    Uo = Us.gather(1, order.unsqueeze(2).expand(B, k, L)).gather(2, order.unsqueeze(1).expand(B, k, k))
    inc = -uo - torch.tril(Uo, diagonal=-1).sum(dim=2) - 0.5 * torch.diagonal(Uo, dim1=1, dim2=2)
    prefix_E = torch.cat([torch.zeros_like(u[:, :1]), inc.cumsum(dim=1)], dim=1)    # [B, k + 1]
    m = prefix_E.argmin(dim=1, keepdim=True)                               # the first (shortest) minimum
    keep = (torch.arange(k, device=u.device).unsqueeze(0) < m).to(u.dtype)
    return torch.zeros_like(u).scatter_(1, order, keep)


def _local_search(y: Tensor, u: Tensor, Us: Tensor, max_rounds: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Steepest-descent 1-flip search, vectorised over the batch.

    Flipping label i (s_i = 1 - 2 y_i: +1 adds it, -1 removes it) changes E by
        dE_i = -s_i (u_i + (Us y)_i) - 1/2 Us_ii.
    Each round recomputes Us y from y (no accumulated error) and flips argmin_i dE_i in every problem whose
    best dE is below -tol (tol: a few ulps of the energy's scale, so rounding cannot make it cycle). E drops
    strictly at every flip, so the search ends."""
    B, L = u.shape
    diag = torch.diagonal(Us, dim1=1, dim2=2)
    tol = _search_tolerance(u, Us)                                         # [B]
    flips = torch.zeros(B, dtype=torch.int64, device=u.device)
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        s = 1.0 - 2.0 * y
        dE = -s * (u + torch.bmm(Us, y.unsqueeze(-1)).squeeze(-1)) - 0.5 * diag
        best, i = dE.min(dim=1)
        improve = best < -tol
        if not bool(improve.any()):  # one host read per round, for all B problems
            return y, flips
        i = i.unsqueeze(1)
        yi = y.gather(1, i)
        y = y.scatter(1, i, torch.where(improve.unsqueeze(1), 1.0 - yi, yi))
        flips += improve.to(torch.int64)
    return y, flips


def _search_tolerance(u: Tensor, Us: Tensor) -> Tensor:
    """[B]: a move must lower E by more than this, a few ulps of the energy's scale, so that rounding in the
    closed-form energy changes cannot make the search cycle."""
    scale = u.abs().amax(dim=1) + Us.abs().sum(dim=2).amax(dim=1)
    return 64 * torch.finfo(u.dtype).eps * scale


def _local_search_k(y: Tensor, u: Tensor, Us: Tensor, k: int, at_most: bool,
                    max_rounds: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Steepest-descent search among the sets of exactly k labels (swaps) or at most k (swaps, additions
    while |y| < k, removals), vectorised over the batch; y must be feasible.

    With f = u + Us y (recomputed from y every round) and d = diag(Us), the energy changes are
        add i     (y_i = 0)               a_i = -f_i - 1/2 d_i
        remove j  (y_j = 1)               r_j =  f_j - 1/2 d_j
        swap      (i in, j out)           a_i + r_j + Us_ij
    (E(y + e_i - e_j) - E(y) = -u_i + u_j - (Us y)_i + (Us y)_j - 1/2 (d_i + d_j) + Us_ij). Every round
    applies the best move in every problem whose best change is below -tol; E drops strictly at every move,
    so no set comes back and the search ends. Each move counts once in the returned moves."""
    B, L = u.shape
    diag = torch.diagonal(Us, dim1=1, dim2=2)
    tol = _search_tolerance(u, Us)
    moves = torch.zeros(B, dtype=torch.int64, device=u.device)
    rows = torch.arange(B, device=u.device)
    inf = torch.tensor(float("inf"), dtype=u.dtype, device=u.device)
    rounds = 0
    while max_rounds is None or rounds < max_rounds:
        rounds += 1
        f = u + torch.bmm(Us, y.unsqueeze(-1)).squeeze(-1)
        add = -f - 0.5 * diag
        rem = f - 0.5 * diag
        inside = y != 0
        outside = ~inside
        swap = add.unsqueeze(2) + rem.unsqueeze(1) + Us                     # [B, L (in), L (out)]
        dE = [torch.where(outside.unsqueeze(2) & inside.unsqueeze(1), swap, inf).flatten(1)]
        if at_most:
            room = inside.sum(dim=1, keepdim=True) < k
            dE += [torch.where(outside & room, add, inf), torch.where(inside, rem, inf)]
        best, idx = torch.cat(dE, dim=1).min(dim=1)
        improve = best < -tol
        if not bool(improve.any()):  # one host read per round, for all B problems
            return y, moves
        # decode: [0, L^2) swap i = idx // L in, j = idx % L out; then L additions, then L removals
        is_swap = idx < L * L
        is_add = ~is_swap & (idx < L * L + L)
        is_rem = idx >= L * L + L
        i_in = torch.where(is_swap, idx // L, idx - L * L).clamp(max=L - 1)
        j_out = torch.where(is_swap, idx % L, idx - L * L - L).clamp(min=0)
        step = torch.zeros_like(y)
        step[rows, i_in] += ((is_swap | is_add) & improve).to(u.dtype)
        step[rows, j_out] -= ((is_swap | is_rem) & improve).to(u.dtype)
        y = y + step
        moves += improve.to(torch.int64)
    return y, moves
