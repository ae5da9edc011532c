"""Verification of externally proposed candidates: ``pyebm.rerank`` and ``pyebm.RerankResult``.

A fast generator (a sampler, a diffusion policy, a language model, a heuristic) proposes N candidates per
context; an energy scores them, optionally refines them by descent, and keeps the best k::

    res = pyebm.rerank(energy, x, proposals, k=4)                   # proposals [B, N, *event]
    res.index [B, k], res.states [B, k, *event], res.energy [B, k]  # lowest energy first
    res = pyebm.rerank(energy, x, proposals, temperature=1.0)
    res.probs [B, N]                                                # softmax(-E / T) over each row's candidates

Contexts with different numbers of proposals are given as a list of B tensors [N_b, *event]; they are padded
to the largest N_b (with copies of the row's first proposal, so padding is always a valid input of the
energy) and masked out of the selection and the distribution.

All B * N candidates are scored in one call of the energy (``energy.energy(ctx, y)``: the fused op where the
model has one), the context prepared once. ``refine=pyebm.Descent(...)`` first runs ``pyebm.minimize`` with the
proposals as its initial states (same engine, same paths as any minimize call) and scores the refined states
by that call's final energy pass. Selection (a stable sort of the energies) and the distribution are computed
on the device; the host reads nothing per context (a mask tensor given by the caller is read once to check
that every row has at least k candidates).
"""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pyebm import _dispatch
from pyebm.config import Descent
from pyebm.descent import DescentResult, _as_model, _event_shape_of, minimize


@dataclass
class RerankResult:
    """What ``rerank`` found. Every field is a value computed during the call.

    index [B, k] (int64): the chosen candidates' positions among each context's proposals, lowest energy
    first; equal energies keep the proposals' order (lower position first).
    states [B, k, *event]: the chosen candidates (their refined states with ``refine``).
    energy [B, k]: their energies.
    all_energy [B, N]: every candidate's energy; padded (masked-out) entries are +inf.
    probs [B, N] or None: with ``temperature`` T, softmax(-E / T) over each context's valid candidates;
    masked entries and candidates with a non-finite energy get 0 (a row whose valid energies are all
    non-finite gets the uniform distribution over its valid candidates).
    mask [B, N] (bool): which entries are real proposals.
    refined: the ``DescentResult`` of the refining descent (``refine``), else None.
    """

    index: Tensor
    states: Tensor
    energy: Tensor
    all_energy: Tensor
    probs: Optional[Tensor]
    mask: Tensor
    refined: Optional[DescentResult] = None

    @property
    def best(self) -> Tensor:
        """The lowest-energy candidate of each context [B, *event]."""
        return self.states[:, 0]

    @property
    def best_energy(self) -> Tensor:
        """Its energy [B]."""
        return self.energy[:, 0]


def _policy_parts(policy) -> Optional[Tuple[Any, Any, Any]]:
    """(energy, context -> energy context, (to event, to chunks)) of an ``EnergyPolicy``, else None."""
    policies = sys.modules.get("pyebm.policies")  # not imported yet: no EnergyPolicy exists
    if policies is None or not isinstance(policy, policies.EnergyPolicy):
        return None
    return policy.energy, policy._context, (policy._event, policy._chunks)


def _stack_list(candidates: Sequence[Tensor]) -> Tuple[Tensor, Tensor, int]:
    """Pad a list of per-context proposals [N_b, *event] to [B, max N_b, *event]; (y, mask, min N_b)."""
    if len(candidates) == 0:
        raise ValueError("rerank: candidates is an empty list; give one tensor [N_b, *event] per context")
    first = candidates[0]
    for b, t in enumerate(candidates):
        if not isinstance(t, Tensor):
            raise TypeError(f"rerank: candidates[{b}] must be a tensor [N_b, *event]; got {type(t).__name__}")
        if t.dim() < 1:
            raise ValueError(f"rerank: candidates[{b}] must be [N_b, *event]; got a 0-d tensor")
        if tuple(t.shape[1:]) != tuple(first.shape[1:]):
            raise ValueError(f"rerank: every candidates[b] must have the same event shape; candidates[0] is "
                             f"{list(first.shape[1:])} but candidates[{b}] is {list(t.shape[1:])}")
        if t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"rerank: candidates[{b}] is {t.dtype} on {t.device} but candidates[0] is "
                             f"{first.dtype} on {first.device}")
        if t.shape[0] == 0:
            raise ValueError(f"rerank: candidates[{b}] has no proposals (N = 0); every context needs at least one")
    counts = [int(t.shape[0]) for t in candidates]
    N = max(counts)
    rows = []
    for t, n in zip(candidates, counts):
        if n < N:  # pad with copies of the row's first proposal: a valid input of the energy, masked out later
            t = torch.cat([t, t[:1].expand((N - n,) + tuple(t.shape[1:]))], dim=0)
        rows.append(t)
    y = torch.stack(rows, dim=0)
    mask = torch.arange(N, device=y.device).unsqueeze(0) < torch.tensor(counts, device=y.device).unsqueeze(1)
    return y, mask, min(counts)


def _positive_int(name: str, value) -> int:
    if type(value) is int and value >= 1:  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"rerank: {name} must be an int >= 1; got {value!r}")
    return int(value)


def _target_like(model, energy, y: Tensor) -> Tuple[torch.device, torch.dtype]:
    """Device and dtype the energy computes in: its declared dtype / parameters, else the candidates'."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        device = getattr(model, "device", y.device)
        return (device if isinstance(device, torch.device) else torch.device(device)), dtype
    if isinstance(energy, nn.Module):
        for p in energy.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return y.device, y.dtype


def _check_context_batch(context, B: int) -> None:
    if isinstance(context, Tensor):
        if context.dim() < 1 or context.shape[0] != B:
            raise ValueError(f"rerank: context must be [B, ...] with B = {B} (the candidates' first dimension); "
                             f"got shape {list(context.shape)}")
    elif isinstance(context, numbers.Integral) and not isinstance(context, bool):
        if int(context) != B:
            raise ValueError(f"rerank: context as a batch size is {context} but the candidates have B = {B}")


def _rank_key(E: Tensor) -> Tensor:
    """E with every non-finite energy (NaN, +-inf) replaced by +inf: the key candidates are ranked by."""
    return torch.nan_to_num(E, nan=math.inf, posinf=math.inf, neginf=math.inf)


def _select(key: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(order [B, N], the sorted key [B, N] of valid entries, +inf for masked ones): a stable ascending sort
    of the energies. Non-finite energies rank after every finite one, masked entries after those; equal
    energies keep the proposals' order. ``mask`` None: every entry is valid.

    Every entry valid: one stable sort of the key, which already puts the non-finite energies (+inf) after
    every finite one in the proposals' order. With masked entries: the key with +inf at masked entries,
    then stably by class (finite valid, non-finite valid, masked): within a class the energy order stays."""
    if mask is None:
        values, order = torch.sort(key, dim=1, stable=True)
        return order, values
    key = torch.where(mask, key, math.inf)
    values, order = torch.sort(key, dim=1, stable=True)
    cls = torch.where(mask, torch.where(torch.isfinite(key), 0, 1), 2).to(torch.int8)
    cls_sorted = torch.gather(cls, 1, order)
    return torch.gather(order, 1, torch.sort(cls_sorted, dim=1, stable=True).indices), values


def _distribution(key: Tensor, sorted_key: Tensor, mask: Optional[Tensor], temperature: float) -> Tensor:
    """softmax(-E / T) over each row's valid candidates with a finite energy; masked entries and non-finite
    energies get 0; a row without a finite valid energy gets the uniform distribution over its valid
    candidates. ``key`` is ``_rank_key(E)``, ``sorted_key`` a row-wise ascending sort of it with masked entries
    at +inf (its first column is +inf exactly in the rows without a finite valid energy)."""
    # key / (-T) is -E / T bit for bit where E is finite (the sign of a quotient is exact), -inf elsewhere
    logits = torch.div(key, -temperature)
    none_finite = torch.isposinf(sorted_key.narrow(1, 0, 1))  # [B, 1]
    if mask is not None:
        logits.masked_fill_(~mask, -math.inf)
        none_finite = none_finite & mask
    return torch.softmax(logits.masked_fill_(none_finite, 0.0), 1)  # (dim given positionally: cheaper to parse)


def rerank(energy: Any, context: Any, candidates: Union[Tensor, Sequence[Tensor]], k: int = 1,
           refine: Optional[Descent] = None, temperature: Optional[float] = None, mask: Optional[Tensor] = None,
           *, backend: Optional[str] = None, generator: Union[None, int, torch.Generator] = None) -> RerankResult:
    """Score externally proposed candidates with an energy, optionally refine them, keep the best ``k``.

    energy       an energy model (``prepare`` / ``energy`` / ``energy_and_grad``: MLPEnergy, EBT, EBTPolicy,
                 see ``pyebm.protocol``), an ``EnergyPolicy`` (candidates are action chunks [B, N, horizon,
                 action_dim], context its observations, as ``act`` takes them), or any ``f(x, y) -> E [B, K]``
                 (an nn.Module or function; scored under ``torch.no_grad``, refined through autograd on y).
    context      what the energy is conditioned on: a tensor [B, ...] (an int B or None for context-free
                 energies); prepared once.
    candidates   proposals [B, N, *event], or a list of B tensors [N_b, *event] (padded and masked).
                 Floating point; moved to the energy's device and dtype.
    k            how many to keep per context (1 <= k <= the fewest valid proposals of any context).
    refine       a ``pyebm.Descent``: run ``pyebm.minimize`` from the proposals (``init=candidates``) before
                 scoring; the states returned are the refined ones and ``index`` still names the proposal each
                 descended from. ``method="dfo"`` (which resamples candidates) is refused. The descent's own
                 ``selection`` is not used: rerank always ranks by final energy. With an ``EnergyPolicy``,
                 ``refine=policy.descent`` is the policy's own update rule, action bounds included.
    temperature  T > 0: also return ``probs`` = softmax(-E / T) over each context's valid candidates.
    mask         bool [B, N], True for real proposals (with a tensor ``candidates``); default all True.
    backend      passed on to the energy's fused ops (as in ``minimize``).
    generator    the refining descent's noise (as in ``minimize``).

    Returns a ``RerankResult``. Non-finite energies rank after every finite one. Without ``refine`` the
    energy is called exactly once, on all B * N candidates.
    """
    _dispatch.check_not_traced("pyebm.rerank")
    k = _positive_int("k", k)
    if refine is not None:
        if not isinstance(refine, Descent):
            raise TypeError(f"rerank: refine must be a pyebm.Descent or None; got {type(refine).__name__}")
        if refine.method == "dfo":
            raise ValueError("rerank: refine with method='dfo' resamples candidates, so a refined state would not "
                             "descend from its proposal; use a gradient method")
    if temperature is not None and not (type(temperature) is float and 0 < temperature < math.inf):
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
                or not math.isfinite(float(temperature)) or temperature <= 0:
            raise ValueError(f"rerank: temperature must be a finite number > 0 or None; got {temperature!r}")
        temperature = float(temperature)
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"rerank: backend must be a string or None; got {type(backend).__name__}")

    policy = _policy_parts(energy)
    to_event = to_chunks = None
    if policy is not None:
        energy, as_context, (to_event, to_chunks) = policy
        context = as_context(context)

    # candidates and mask
    min_valid: Optional[int] = None
    if isinstance(candidates, (list, tuple)):
        if mask is not None:
            raise ValueError("rerank: mask is built from the lengths of a list of candidates; pass mask=None "
                             "(or give candidates as one tensor [B, N, *event] with its mask)")
        y, mask_full, min_valid = _stack_list(candidates)
    elif isinstance(candidates, Tensor):
        y = candidates
        if y.dim() < 2:
            raise ValueError(f"rerank: candidates must be [B, N, *event]; got shape {list(y.shape)}")
        mask_full = None
    else:
        raise TypeError("rerank: candidates must be a tensor [B, N, *event] or a list of tensors [N_b, *event]; "
                        f"got {type(candidates).__name__}")
    if not y.is_floating_point() or y.is_complex():
        raise TypeError(f"rerank: candidates must be real floating point; got {y.dtype}")
    B, N = int(y.shape[0]), int(y.shape[1])
    if N == 0:
        raise ValueError(f"rerank: candidates has N = 0 proposals per context (shape {list(y.shape)})")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError("rerank: mask must be a bool tensor [B, N]; got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"rerank: mask must be [B, N] = {[B, N]} (the candidates' first two dimensions); "
                             f"got {list(mask.shape)}")
        mask_full = mask.to(y.device)
        if B > 0:  # one host read for the whole batch: every row needs k valid proposals
            min_valid = int(mask_full.sum(dim=1).min())
    all_valid = min_valid == N  # known on the host: no mask, a list of equal lengths, or a mask without a False
    if mask_full is None:
        mask_full = torch.ones(B, N, dtype=torch.bool, device=y.device)
        min_valid = N
        all_valid = True
    if B > 0 and min_valid is not None and k > min_valid:
        what = "valid (unmasked) proposals" if mask is not None else "proposals"
        raise ValueError(f"rerank: k = {k} but a context has only {min_valid} {what}")
    _check_context_batch(context, B)

    if to_event is not None:
        y = to_event(y)
    model, generic = _as_model(energy)
    event = _event_shape_of(model)
    if event is not None and tuple(y.shape[2:]) != tuple(event):
        raise ValueError(f"rerank: candidates must be [B, N, *event] with event = {list(event)} (the energy's "
                         f"event_shape); got shape {list(y.shape)}")
    event = tuple(y.shape[2:])
    device, dtype = _target_like(model, energy, y)
    if y.dtype != dtype or y.device != device:
        y = y.to(device=device, dtype=dtype)
        mask_full = mask_full.to(device)  # the mask is on the candidates' device
    if y.requires_grad:
        y = y.detach()

    if B == 0:
        return _empty(B, k, event, device, dtype, mask_full, temperature, to_chunks)

    refined = None
    if refine is not None:
        refined = minimize(energy, context, candidates=N, config=refine, init=y, generator=generator,
                           backend=backend, event_shape=event)
        y, E = refined.y, refined.energy
    else:
        kwargs = {} if backend is None else {"backend": backend}
        ctx = model.prepare(context)
        E = model.energy(ctx, y, **kwargs)
        if not isinstance(E, Tensor) or tuple(E.shape) != (B, N):
            raise ValueError(f"rerank: the energy must return E [B, N] = {[B, N]}; got "
                             f"{list(E.shape) if isinstance(E, Tensor) else type(E).__name__}")
        if E.requires_grad:
            E = E.detach()
    if E.device != device:
        E = E.to(device)

    # valid None: every entry is valid (no mask given, or one without a False), and the masked variants of the
    # selection and the distribution are skipped
    valid = None if all_valid else mask_full
    key = _rank_key(E)
    order, sorted_key = _select(key, valid)
    index = order.narrow(1, 0, k)
    states = torch.gather(y, 1, index.view(B, k, *((1,) * len(event))).expand(B, k, *event))
    chosen_E = torch.gather(E, 1, index)
    # a value of its own (not the energy's output tensor, which a model or the refining descent may hold)
    all_energy = E.clone() if valid is None else torch.where(valid, E, math.inf)
    probs = None if temperature is None else _distribution(key, sorted_key, valid, temperature)
    if to_chunks is not None:
        states = to_chunks(states)
    return RerankResult(index=index, states=states, energy=chosen_E, all_energy=all_energy, probs=probs,
                        mask=mask_full, refined=refined)


def _empty(B, k, event, device, dtype, mask, temperature, to_chunks) -> RerankResult:
    N = mask.shape[1]
    states = torch.empty((0, k) + event, device=device, dtype=dtype)
    if to_chunks is not None:
        states = to_chunks(states)
    return RerankResult(index=torch.empty(0, k, dtype=torch.long, device=device), states=states,
                        energy=torch.empty(0, k, device=device, dtype=dtype),
                        all_energy=torch.empty(0, N, device=device, dtype=dtype),
                        probs=None if temperature is None else torch.empty(0, N, device=device, dtype=dtype),
                        mask=mask)
