"""Argmin of energies over sets: y in {0, 1}^L (multilabel), batched over B.

Sign convention: u are scores (higher is better), the energy is their negation, and the argmin maximises the
score:

    unary     E(y) = -<u, y>
    pairwise  E(y) = -<u, y> - 1/2 <y, U y>      (Ising-type; only the symmetric part (U + U^T) / 2 matters)

``set_argmin`` is exact for unary energies (with or without a cardinality constraint) and a local method for
pairwise ones (projected gradient on the relaxation [0, 1]^L, rounding, then 1-flip local search until no
single flip lowers E): the result is a 1-flip local minimum, not always the global one.
"""
from __future__ import annotations

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
    flips   [B] int64: single flips the local search made (pairwise energies), else None.
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
               init: Optional[Tensor] = None, steps: int = 100, step_size: Optional[float] = None) -> SetResult:
    """The set y in {0, 1}^L of lowest energy E(y) = -<u, y> (- 1/2 <y, U y>), batched over B.

    u       scores [B, L] (or [L] for one problem).
    U       pairwise couplings [B, L, L] or [L, L] (shared by the batch), or None for unary energies. Only
            (U + U^T) / 2 matters; its diagonal acts like extra unary scores (y_i^2 = y_i).

    Unary energies (exact):
      k None      y_i = 1 where u_i > 0 (entries with u_i = 0 stay out: the smallest of the minimisers).
      k given     exactly k labels: the k largest scores, whatever their sign (ties: lower index first).
      at_most     with k: at most k labels: the k largest scores, keeping only the positive ones.

    Pairwise energies (local, ``exact=False``): ``steps`` projected-gradient steps on the relaxation
    z in [0, 1]^L (from z = 1/2; step 1 / ||(U + U^T)/2||_F unless ``step_size``), rounded at 1/2, then
    steepest-descent 1-flip local search: each round flips, in every problem where it helps, the single label
    whose flip lowers E most, until no flip lowers E by more than rounding error. ``init`` (0/1, shaped like
    u) skips the relaxation and starts the local search from it. The result is 1-flip optimal: no single flip
    lowers its energy. The search reads one bool from the device per round (all problems together). A
    cardinality constraint (k) is only implemented for unary energies.
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
    if k is not None:
        raise ValueError(f"{where}: a cardinality constraint (k) is implemented for unary energies only (U=None)")
    if init is not None:
        y = _check_binary("init", init, u2, unbatched, where).clone()
    else:
        steps = _int_arg("steps", steps, 0, 10 ** 9, where)
        if step_size is not None and (isinstance(step_size, bool) or not isinstance(step_size, numbers.Real)
                                      or not step_size > 0):
            raise ValueError(f"{where}: step_size must be a number > 0 or None; got {step_size!r}")
        y = _relax_and_round(u2, Us, steps, step_size)
    y, flips = _local_search(y, u2, Us)
    return _finish(SetResult(y, _energy(y, u2, Us), False, flips), unbatched)


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


def _local_search(y: Tensor, u: Tensor, Us: Tensor) -> Tuple[Tensor, Tensor]:
    """Steepest-descent 1-flip search, vectorised over the batch.

    Flipping label i (s_i = 1 - 2 y_i: +1 adds it, -1 removes it) changes E by
        dE_i = -s_i (u_i + (Us y)_i) - 1/2 Us_ii.
    Each round recomputes Us y from y (no accumulated error) and flips argmin_i dE_i in every problem whose
    best dE is below -tol (tol: a few ulps of the energy's scale, so rounding cannot make it cycle). E drops
    strictly at every flip, so the search ends."""
    B, L = u.shape
    diag = torch.diagonal(Us, dim1=1, dim2=2)
    scale = u.abs().amax(dim=1) + Us.abs().sum(dim=2).amax(dim=1)
    tol = 64 * torch.finfo(u.dtype).eps * scale                            # [B]
    flips = torch.zeros(B, dtype=torch.int64, device=u.device)
    while True:
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
