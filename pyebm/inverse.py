"""Inverse problems: an energy with a data-consistency term, ``pyebm.DataConsistency``.

    V = pyebm.DataConsistency(energy, A=A, b=b, weight=w)       # E(x, y) + w/2 ||A vec(y) - b||^2
    V = pyebm.DataConsistency(energy, term=lambda y: ...)        # E(x, y) + term(y)  (term [B, K])
    res = pyebm.minimize(V, x, K, pyebm.Descent.energy_matching(), init=...)

The other route to inverse problems, clamping observed coordinates at every step (inpainting), is
``minimize(..., init=y0, mask=mask)``: coordinates where ``mask`` is True keep their ``init`` values.

With an Energy Matching potential V and temperature epsilon_max, the stationary law of the sampler on
``V + w/2 ||A y - b||^2`` is exp(-V / eps_max) N(b; A y, zeta^2 I) for w = eps_max / zeta^2 (a Gaussian
likelihood of noise std zeta). The public protein-design sampler scales its guidance by eps(t) / zeta^2 at
every step (no guidance before the cutoff); the weight here is constant in t, which gives the same law
once eps(t) = eps_max.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn


class DataConsistency(nn.Module):
    """An energy model for inverse problems: ``energy(x, y) + data(y)`` with

    data(y) = weight / 2 * ||A vec(y) - b||^2      (A [M, D] or [B, M, D], b [M] or [B, M]; A=None: identity)
    data(y) = term(y)                               (a callable y [B, K, *event] -> [B, K])

    D is the number of elements of one candidate (vec(y) flattens its event dims). The quadratic term's
    gradient ``weight * A^T (A vec(y) - b)`` is computed in closed form; a callable ``term`` is
    differentiated by autograd on y only (no second-order graph). ``energy`` is an energy model
    (``pyebm.protocol``) or a plain ``f(x, y) -> E [B, K]``; its ``energy_and_grad`` supplies the rest, so
    the sum never builds a graph over the energy's weights beyond what that energy does. Candidates,
    ``event_shape``, dtype and device are the energy's.
    """

    def __init__(self, energy: Any, A: Optional[Tensor] = None, b: Optional[Tensor] = None, weight: float = 1.0,
                 term: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__()
        from pyebm.descent import _as_model  # the adapter minimize uses for plain f(x, y)

        if term is not None and (A is not None or b is not None):
            raise ValueError("DataConsistency: give either term or (A, b), not both")
        if term is None and b is None:
            raise ValueError("DataConsistency: needs b (the observations; A defaults to the identity) or term")
        if term is not None and not callable(term):
            raise TypeError(f"DataConsistency: term must be callable as term(y) -> [B, K]; got "
                            f"{type(term).__name__}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) \
                or weight <= 0:
            raise ValueError(f"DataConsistency: weight must be a finite number > 0; got {weight!r}")
        for name, t in (("A", A), ("b", b)):
            if t is not None and (not isinstance(t, Tensor) or not t.is_floating_point()):
                raise TypeError(f"DataConsistency: {name} must be a floating tensor; got "
                                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
        if A is not None and A.dim() not in (2, 3):
            raise ValueError(f"DataConsistency: A must be [M, D] or [B, M, D]; got shape {list(A.shape)}")
        if b is not None and b.dim() not in (1, 2):
            raise ValueError(f"DataConsistency: b must be [M] or [B, M]; got shape {list(b.shape)}")
        if A is not None and A.shape[-2] != b.shape[-1]:
            raise ValueError(f"DataConsistency: A has {A.shape[-2]} rows but b has {b.shape[-1]} entries")
        if A is not None and A.dim() == 3 and b.dim() == 2 and A.shape[0] != b.shape[0]:
            raise ValueError(f"DataConsistency: A [B, M, D] and b [B, M] disagree on B: {A.shape[0]} and "
                             f"{b.shape[0]}")
        model, generic = _as_model(energy)
        self.inner = energy      # the caller's energy; a submodule when it is an nn.Module (.to(), state_dict)
        # the protocol view of it (the energy itself, or minimize's autograd adapter for a plain f(x, y)),
        # kept outside the module registry so that a module is not registered twice
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "generic", generic)
        self.term = term
        self.weight = float(weight)
        self.register_buffer("A", None if A is None else A.detach(), persistent=False)
        self.register_buffer("b", None if b is None else b.detach(), persistent=False)

    # -- what minimize reads --------------------------------------------------------------------------
    @property
    def event_shape(self) -> Optional[Tuple[int, ...]]:
        from pyebm.descent import _event_shape_of

        return _event_shape_of(self.inner)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        inner = self.inner
        dtype = getattr(inner, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        if isinstance(inner, nn.Module):
            for p in inner.parameters():
                return p.dtype
        return None

    @property
    def device(self) -> torch.device:
        inner = self.inner
        device = getattr(inner, "device", None)
        if device is not None and not callable(device):
            return torch.device(device)
        if isinstance(inner, nn.Module):
            for p in inner.parameters():
                return p.device
        return torch.device("cpu")

    # -- the energy-model protocol --------------------------------------------------------------------
    def prepare(self, context):
        return self.model.prepare(context)

    def forward(self, context, y: Tensor) -> Tensor:
        """Differentiable E(x, y) + data(y), for training or checking (inference uses energy_and_grad)."""
        E = self.inner(context, y)
        if self.term is not None:
            return E + self.term(y)
        return E + self._data(y, need_grad=False)[0]

    def energy(self, ctx, y: Tensor, backend: Optional[str] = None) -> Tensor:
        E = self.model.energy(ctx, y, **self._backend_kw(backend))
        with torch.no_grad():
            return E + self._data(y, need_grad=False)[0]

    def energy_and_grad(self, ctx, y: Tensor, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
        E, G = self.model.energy_and_grad(ctx, y, **self._backend_kw(backend))
        Ed, Gd = self._data(y, need_grad=True)
        return E + Ed, G + Gd

    def _backend_kw(self, backend: Optional[str]) -> dict:
        # a plain f(x, y) has no fused ops to choose a backend for
        return {} if backend is None or self.generic else {"backend": backend}

    def explain_energy(self, ctx, y: Tensor, backend: Optional[str] = None) -> str:
        describe = getattr(self.model, "explain_energy", None)
        if self.generic:
            inner = "autograd on y of the plain energy f(x, y)"
        elif callable(describe):
            inner = describe(ctx, y, backend)
        else:
            inner = f"{type(self.model).__name__}.energy_and_grad"
        data = "a callable term (autograd on y)" if self.term is not None else "w/2 ||A y - b||^2 in closed form"
        return f"{inner}, plus {data}"

    # -- the data term --------------------------------------------------------------------------------
    def _data(self, y: Tensor, need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
        B, K = y.shape[0], y.shape[1]
        if self.term is not None:
            return self._term(y, need_grad)
        yf = y.reshape(B, K, -1)
        D = yf.shape[2]
        b = self.b.to(device=y.device, dtype=y.dtype)
        if b.dim() == 2 and b.shape[0] != B:
            raise ValueError(f"DataConsistency: b has {b.shape[0]} rows but the candidates have B = {B}")
        bb = b.unsqueeze(-2)                                               # [M] -> [1, M], [B, M] -> [B, 1, M]
        if self.A is None:
            if b.shape[-1] != D:
                raise ValueError(f"DataConsistency: with A=None b must have D = {D} entries; got {b.shape[-1]}")
            r = yf - bb
        else:
            A = self.A.to(device=y.device, dtype=y.dtype)
            if A.shape[-1] != D:
                raise ValueError(f"DataConsistency: A has {A.shape[-1]} columns but a candidate has D = {D} "
                                 "elements")
            if A.dim() == 3 and A.shape[0] != B:
                raise ValueError(f"DataConsistency: A has {A.shape[0]} rows of B but the candidates have B = {B}")
            r = torch.matmul(yf, A.transpose(-1, -2)) - bb                  # [B, K, M]
        E = (0.5 * self.weight) * r.square().sum(dim=2)
        if not need_grad:
            return E, None
        G = r if self.A is None else torch.matmul(r, A)                    # [B, K, D]
        return E, (self.weight * G).reshape(y.shape)

    def _term(self, y: Tensor, need_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
        B, K = y.shape[0], y.shape[1]
        if not need_grad:
            with torch.no_grad():
                E = self.term(y)
            self._check_term(E, B, K)
            return E, None
        with torch.enable_grad():
            yy = y.detach().requires_grad_(True)
            E = self.term(yy)
            self._check_term(E, B, K)
            if not E.requires_grad:
                raise ValueError("DataConsistency: term(y) must depend on y differentiably")
            (G,) = torch.autograd.grad(E.sum(), yy)
        return E.detach(), G

    @staticmethod
    def _check_term(E, B, K) -> None:
        if not isinstance(E, Tensor) or tuple(E.shape) != (B, K):
            raise ValueError(f"DataConsistency: term(y) must return [B, K] = {[B, K]}; got "
                             f"{list(E.shape) if isinstance(E, Tensor) else type(E).__name__}")
