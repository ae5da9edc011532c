"""Energy models with cached context and a fused energy + input-gradient path."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pyebm import _backend, ops
from pyebm.reference import mlp_energy as ref

_MlpPlan = getattr(_backend.ext(), "MlpPlan", None)


def _slots_unchanged(slots) -> bool:
    return all(slot.get(name) is param for slot, name, param in slots)


class MLPEnergy(nn.Module):
    """E(x, y) = w_out . h_L + b_out with h_1 = act(W_x x + W_y y + b_1), h_{l+1} = act(W_l h_l + b_l).

    With ``residual=True`` a layer whose input and output widths match adds its input
    (h_{l+1} = act(W_l h_l + b_l) + h_l): the dense-residual energy of implicit behavioural cloning.
    ``context_dim=0`` means no context.

    Inference API (no autograd graph, fused kernels):
        ctx = energy.prepare(x)               # x [B, context_dim] -> [B, H1], computed once per context
        E = energy.energy(ctx, y)             # y [B, K, candidate_dim] -> E [B, K]
        E, G = energy.energy_and_grad(ctx, y) # G = dE/dy [B, K, candidate_dim]
    Training: ``energy(x, y)`` is the plain differentiable forward (gradients reach the weights).

    ``backend`` fixes the backend for this model (default: ``PYEBM_BACKEND``, then ``auto``).
    """

    def __init__(self, context_dim: int, candidate_dim: int, hidden: Sequence[int] = (256, 256),
                 activation: str = "silu", residual: bool = False, bias: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim must be an int >= 0; got {context_dim!r}")
        if not isinstance(candidate_dim, int) or candidate_dim < 1:
            raise ValueError(f"candidate_dim must be an int >= 1; got {candidate_dim!r}")
        hidden = tuple(int(h) for h in hidden)
        if len(hidden) < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of widths >= 1; got {hidden!r}")
        if len(hidden) > 64:
            raise ValueError(f"hidden may have at most 64 layers; got {len(hidden)}")
        ref.activation_fn(activation)  # validates the name
        kw = {"device": device, "dtype": dtype}
        self.context_dim = context_dim
        self.candidate_dim = candidate_dim
        self.hidden = hidden
        self.activation = activation
        self.residual = bool(residual)
        self.bias = bool(bias)
        self.backend = backend
        self.x_proj = nn.Linear(context_dim, hidden[0], bias=False, **kw) if context_dim > 0 else None
        self.y_proj = nn.Linear(candidate_dim, hidden[0], bias=bias, **kw)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias, **kw) for a, b in zip(hidden[:-1], hidden[1:]))
        self.head = nn.Linear(hidden[-1], 1, bias=bias, **kw)
        self._zeros: Dict[Tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
        self._params_cache = None
        self._plan_cache = None
        self._plan_dtype = None

    def extra_repr(self) -> str:
        return (f"context_dim={self.context_dim}, candidate_dim={self.candidate_dim}, hidden={self.hidden}, "
                f"activation={self.activation!r}, residual={self.residual}, bias={self.bias}")

    # -- parameters in the op layout ------------------------------------------------------------
    def _zero(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype, n)
        z = self._zeros.get(key)
        if z is None:
            z = self._zeros[key] = torch.zeros(n, device=like.device, dtype=like.dtype)
        return z

    def _apply(self, *args, **kwargs):
        # .to() / .cuda() / .double() move parameter storage: views cached in op_params go stale.
        self._params_cache = None
        self._plan_cache = None
        self._zeros = {}
        return super()._apply(*args, **kwargs)

    def op_params(self):
        """(w_in, weights, biases, w_out, b_out) as the fused ops take them.

        Cached: in-place updates and ``load_state_dict`` keep the cache valid; ``.to()`` and friends clear
        it, and it is rebuilt when a parameter object has been replaced by assignment.
        """
        cache = self._params_cache
        if cache is not None and _slots_unchanged(cache[1]):
            return cache[0]
        watch = self._param_slots()
        params = self._build_op_params()
        self._params_cache = (params, watch)
        return params

    def _param_slots(self):
        """(parameter dict, name, parameter) of every parameter: a cache built from them is stale once one of
        these slots holds another object."""
        mods = [self.y_proj, self.head, *self.layers] + ([self.x_proj] if self.x_proj is not None else [])
        return [(mod._parameters, name, param) for mod in mods for name, param in mod._parameters.items()]

    def _build_op_params(self):
        w_in = self.y_proj.weight
        weights = [layer.weight for layer in self.layers]
        if self.bias:
            biases = [layer.bias for layer in self.layers]
            b_out = self.head.bias
        else:
            biases = [self._zero(layer.out_features, w_in) for layer in self.layers]
            b_out = self._zero(1, w_in)
        return w_in, weights, biases, self.head.weight.view(-1), b_out

    def cpu_plan(self):
        """The cpu backend's plan (``pyebm._C.MlpPlan``): the weights checked, laid out and packed once and
        called without the dispatcher; None when there is none (no extension, weights not float32/float64
        on CPU).

        Eager calls on CPU tensors go through it (``energy``, ``energy_and_grad``, ``minimize``'s whole
        loop); the ``torch.ops.pyebm`` ops run the same kernels on the same values (same numbers), and stay
        the path under torch.compile. In-place weight updates are seen (the plan repacks what changed);
        replacing a parameter or moving the module builds a new plan.
        """
        cache = self._plan_cache
        if cache is not None:
            plan = cache[0]
            if plan is not None and not plan.stale:
                return plan
            if plan is None and _slots_unchanged(cache[1]):
                return None
        plan = None
        w_in, weights, biases, w_out, b_out = self.op_params()
        watch = self._param_slots()
        if _MlpPlan is not None and w_in.device.type == "cpu" and w_in.dtype in (torch.float32, torch.float64):
            w_x = self.x_proj.weight if self.x_proj is not None else None
            plan = _MlpPlan(w_x, w_in, self._b_in(), list(weights), list(biases), w_out, b_out, self.activation,
                            self.residual)
            plan.watch(watch)
        self._plan_cache = (plan, watch)
        self._plan_dtype = w_in.dtype if plan is not None else None
        return plan

    def _fast_plan(self, ctx, y, backend):
        """The plan when this call runs on the cpu backend in eager mode, else None. Not checked for
        staleness here: the plan's calls check it themselves and return None (see ``_replanned``)."""
        if type(y) is not torch.Tensor or type(ctx) is not torch.Tensor or not y.is_cpu \
                or torch.compiler.is_compiling():
            return None
        if not _backend.resolves_to_cpu(backend or self.backend):
            return None
        cache = self._plan_cache
        return cache[0] if cache is not None and cache[0] is not None else self.cpu_plan()

    def _replanned(self, plan, method: str, ctx, y):
        """After ``plan.<method>`` returned None: when the plan is stale (a parameter object was replaced),
        build the new plan and call it; else None (inputs no plan takes as they are)."""
        if not plan.stale:
            return None
        plan = self.cpu_plan()
        return None if plan is None else getattr(plan, method)(ctx, y)

    def _b_in(self) -> Optional[torch.Tensor]:
        return self.y_proj.bias if self.bias else None

    # -- inference ----------------------------------------------------------------------------
    def prepare(self, x: Union[torch.Tensor, int, None], batch: Optional[int] = None) -> torch.Tensor:
        """Context term c = W_x x + b_1, [B, H1]. With context_dim 0, x may be an int B or [B, 0]."""
        w = self.y_proj.weight
        if self.context_dim == 0:
            if isinstance(x, int):
                B = x
            elif x is None:
                if batch is None:
                    raise ValueError("prepare: this energy has no context; pass the batch size (x=B)")
                B = batch
            else:
                if x.dim() != 2 or x.shape[1] != 0:
                    raise ValueError(f"prepare: x must be [B, 0] for context_dim=0; got shape {tuple(x.shape)}")
                B = x.shape[0]
            with torch.no_grad():
                return ref.mlp_context(None, None, self._b_in(), B, self.hidden[0], w)
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.context_dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"prepare: x must be [B, context_dim={self.context_dim}]; got {shape}")
        if x.device != w.device or x.dtype != w.dtype:
            raise ValueError(f"prepare: x is {x.dtype} on {x.device} but the model is {w.dtype} on {w.device}")
        with torch.no_grad():
            return ref.mlp_context(x, self.x_proj.weight, self._b_in(), x.shape[0], self.hidden[0], w)

    def _check_y(self, ctx: torch.Tensor, y: torch.Tensor) -> None:
        if y.dim() != 3 or y.shape[2] != self.candidate_dim:
            raise ValueError(f"y must be [B, K, candidate_dim={self.candidate_dim}]; got shape {tuple(y.shape)}")
        if ctx.dim() != 2 or ctx.shape[0] != y.shape[0] or ctx.shape[1] != self.hidden[0]:
            raise ValueError(f"ctx must be [B={y.shape[0]}, {self.hidden[0]}] (from prepare(x)); "
                             f"got shape {tuple(ctx.shape)}")

    def energy(self, ctx: torch.Tensor, y: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """E [B, K] for y [B, K, candidate_dim]."""
        return self._fused("energy", ops.mlp_energy, ctx, y, backend)

    def energy_and_grad(self, ctx: torch.Tensor, y: torch.Tensor,
                        backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(E [B, K], dE/dy [B, K, candidate_dim]) in one fused call."""
        return self._fused("energy_and_grad", ops.mlp_energy_grad, ctx, y, backend)

    def _fused(self, method: str, op, ctx: torch.Tensor, y: torch.Tensor, backend: Optional[str]):
        """The cpu plan's ``method`` when it takes these inputs, else the op ``op``; no autograd graph."""
        plan = self._fast_plan(ctx, y, backend)
        if plan is not None:
            out = getattr(plan, method)(ctx, y)
            if out is None:
                out = self._replanned(plan, method, ctx, y)
            if out is not None:
                return out
        self._check_y(ctx, y)
        w_in, weights, biases, w_out, b_out = self.op_params()
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # no autograd graph; cheaper than the no_grad context manager
        try:
            return op(ctx, y, w_in, weights, biases, w_out, b_out, self.activation, self.residual,
                      backend=backend or self.backend)
        finally:
            torch._C._set_grad_enabled(prev)

    # -- training -----------------------------------------------------------------------------
    def forward(self, x: Optional[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        """Differentiable E: y [B, K, D] -> [B, K], or y [B, D] -> [B]. Plain autograd (training)."""
        squeeze = y.dim() == 2
        if squeeze:
            y = y.unsqueeze(1)
        if y.dim() != 3 or y.shape[2] != self.candidate_dim:
            raise ValueError(f"y must be [B, K, {self.candidate_dim}] or [B, {self.candidate_dim}]; "
                             f"got shape {tuple(y.shape)}")
        B = y.shape[0]
        if self.context_dim > 0:
            if x is None or x.dim() != 2 or x.shape != (B, self.context_dim):
                shape = None if x is None else tuple(x.shape)
                raise ValueError(f"x must be [B={B}, context_dim={self.context_dim}]; got {shape}")
            ctx = ref.mlp_context(x, self.x_proj.weight, self._b_in(), B, self.hidden[0], y)
        else:
            ctx = ref.mlp_context(None, None, self._b_in(), B, self.hidden[0], y)
        w_in, weights, biases, w_out, b_out = self.op_params()
        E = ref.mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, self.activation, self.residual)
        return E.squeeze(1) if squeeze else E
