"""Energy models with cached context and a fused energy + input-gradient path."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from pyebm import _backend, _dispatch, _state, ops
from pyebm.config import rule_options, schedules
from pyebm.ops import mlp_descent as _mlp_descent
from pyebm.pretrained import Pretrained
from pyebm.protocol import WholeLoopSpec
from pyebm.reference import mlp_energy as ref

_MlpPlan = getattr(_backend.ext(), "MlpPlan", None)
_DescentRule = getattr(_backend.ext(), "DescentRule", None)
_WHOLE_LOOP_NOISE = ("none", "langevin", "step", "additive")
_CPU = torch.device("cpu")


def _dim_arg(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"MLPEnergy: {name} must be an int; got {value!r}")
    if value < lo:
        raise ValueError(f"MLPEnergy: {name} must be an int >= {lo}; got {value!r}")
    return int(value)


def _hidden_arg(hidden) -> Tuple[int, ...]:
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        raise TypeError(f"MLPEnergy: hidden must be a sequence of layer widths, e.g. (256, 256); got {hidden!r}")
    if len(hidden) < 1 or len(hidden) > 64:
        raise ValueError(f"MLPEnergy: hidden must have 1 to 64 layers; got {len(hidden)}")
    for h in hidden:
        if isinstance(h, bool) or not isinstance(h, numbers.Integral):
            raise TypeError(f"MLPEnergy: hidden widths must be ints; got {hidden!r}")
        if h < 1:
            raise ValueError(f"MLPEnergy: hidden widths must be >= 1; got {hidden!r}")
    return tuple(int(h) for h in hidden)


def _check_backend_arg(backend) -> None:
    if backend is None:
        return
    if not isinstance(backend, str) or backend.lower() not in ("auto",) + _backend.BACKENDS:
        raise ValueError(f"backend must be None or one of auto, {', '.join(_backend.BACKENDS)}; got {backend!r}")


def _check_dtype_arg(dtype) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"MLPEnergy: dtype must be a real floating dtype (float32, float64, bfloat16, float16); "
                        f"got {dtype!r}")


class MLPEnergy(_state.PackedModule, Pretrained):
    """E(x, y) = w_out . h_L + b_out with h_1 = act(W_x x + W_y y + b_1), h_{l+1} = act(W_l h_l + b_l).

    With ``residual=True`` a layer whose input and output widths match adds its input
    (h_{l+1} = act(W_l h_l + b_l) + h_l): the dense-residual energy of implicit behavioural cloning.
    ``context_dim=0`` means no context.

    Inference API (no autograd graph, fused kernels):
        ctx = energy.prepare(x)               # x [B, context_dim] -> [B, H1], computed once per context
        E = energy.energy(ctx, y)             # y [B, K, candidate_dim] -> E [B, K]
        E, G = energy.energy_and_grad(ctx, y) # G = dE/dy [B, K, candidate_dim]
    Training: ``energy(x, y)`` is the plain differentiable forward (gradients reach the weights).

    Every call computes with the module's current weights (see ``pyebm._state``): on CPU in eager mode
    through a plan that packs them and re-checks, on every call, that the module still holds exactly the
    packed tensors. ``backend`` fixes the backend for this model (default: ``PYEBM_BACKEND``, then ``auto``).
    """

    def __init__(self, context_dim: int, candidate_dim: int, hidden: Sequence[int] = (256, 256),
                 activation: str = "silu", residual: bool = False, bias: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        context_dim = _dim_arg("context_dim", context_dim, 0)
        candidate_dim = _dim_arg("candidate_dim", candidate_dim, 1)
        hidden = _hidden_arg(hidden)
        if not isinstance(activation, str):
            raise TypeError(f"MLPEnergy: activation must be a string; got {activation!r}")
        ref.activation_fn(activation)  # validates the name
        for name, flag in (("residual", residual), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"MLPEnergy: {name} must be True or False; got {flag!r}")
        _check_backend_arg(backend)
        _check_dtype_arg(dtype)
        kw = {"device": device, "dtype": dtype}
        self.context_dim = context_dim
        self.candidate_dim = candidate_dim
        self.hidden = hidden
        self.activation = activation
        self.residual = residual
        self.bias = bias
        self.backend = backend
        self.x_proj = nn.Linear(context_dim, hidden[0], bias=False, **kw) if context_dim > 0 else None
        self.y_proj = nn.Linear(candidate_dim, hidden[0], bias=bias, **kw)
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias, **kw) for a, b in zip(hidden[:-1], hidden[1:]))
        self.head = nn.Linear(hidden[-1], 1, bias=bias, **kw)

    @property
    def event_shape(self) -> Tuple[int]:
        """The shape of one candidate: (candidate_dim,)."""
        return (self.candidate_dim,)

    def _w_in(self) -> Tensor:
        return _state.attr(self.__dict__["_modules"]["y_proj"], "weight")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (and of the candidates minimize draws)."""
        return self._w_in().dtype

    @property
    def device(self) -> torch.device:
        w = self._w_in()
        return _CPU if w.is_cpu else w.device

    def _pretrained_args(self) -> dict:
        """The constructor arguments (``save_pretrained``)."""
        return dict(context_dim=self.context_dim, candidate_dim=self.candidate_dim, hidden=list(self.hidden),
                    activation=self.activation, residual=self.residual, bias=self.bias, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"context_dim={self.context_dim}, candidate_dim={self.candidate_dim}, hidden={self.hidden}, "
                f"activation={self.activation!r}, residual={self.residual}, bias={self.bias}")

    # -- parameters in the op layout ------------------------------------------------------------
    def _zero(self, n: int, like: Tensor) -> Tensor:
        """Zeros standing in for the biases of a model built with bias=False (a constant, kept packed)."""
        key = ("zeros", like.device, like.dtype, n)
        d = _state.packs(self)
        z = d.get(key)
        if z is None:
            z = torch.zeros(n, device=like.device, dtype=like.dtype)
            if not _state._traced():  # a traced call's tensor is the graph's, never kept
                d[key] = z
        return z

    def op_params(self):
        """(w_in, weights, biases, w_out, b_out) as the fused ops take them: the module's current tensors,
        read on every call (parametrizations compute theirs)."""
        attr, mods = _state.attr, self.__dict__["_modules"]
        w_in = attr(mods["y_proj"], "weight")
        layers = mods["layers"].__dict__["_modules"].values()
        weights = [attr(layer, "weight") for layer in layers]
        head = mods["head"]
        if self.bias:
            biases = [attr(layer, "bias") for layer in layers]
            b_out = attr(head, "bias")
        else:
            biases = [self._zero(layer.out_features, w_in) for layer in layers]
            b_out = self._zero(1, w_in)
        return w_in, weights, biases, attr(head, "weight").reshape(-1), b_out

    def _source_names(self):
        """The plan's sources: w_x, w_in, b_in, w_out, b_out, the layers' weights, then their biases."""
        L = len(self.layers)
        b = self.bias
        return (["x_proj.weight" if self.x_proj is not None else None, "y_proj.weight",
                 "y_proj.bias" if b else None, "head.weight", "head.bias" if b else None]
                + [f"layers.{i}.weight" for i in range(L)] + [f"layers.{i}.bias" if b else None for i in range(L)])

    def cpu_plan(self):
        """The cpu backend's plan (``pyebm._C.MlpPlan``), or None (no extension, weights not float32/float64
        on CPU). It packs the weights (transposed copies for the forward products) and, on every call,
        resolves the module's parameters again and packs anew when any of them changed (see
        ``pyebm._state``); the ``torch.ops.pyebm`` ops run the same kernels on the same values."""
        d = _state.packs(self)
        plan = d.get("cpu_plan")
        if plan is None and _MlpPlan is not None:
            w = self._w_in()
            if w.device.type == "cpu" and w.dtype in _dispatch.PLAN_DTYPES:
                plan = d["cpu_plan"] = _MlpPlan(self, self._source_names(), len(self.layers), self.activation,
                                                self.residual)
        return plan

    def _b_in(self) -> Optional[Tensor]:
        return _state.attr(self.__dict__["_modules"]["y_proj"], "bias") if self.bias else None

    def _w_x(self) -> Tensor:
        return _state.attr(self.__dict__["_modules"]["x_proj"], "weight")

    # -- inference ----------------------------------------------------------------------------
    def prepare(self, x: Union[Tensor, int, None], batch: Optional[int] = None) -> Tensor:
        """Context term c = W_x x + b_1, [B, H1]. With context_dim 0, x may be an int B or [B, 0]."""
        w = self._w_in()
        if self.context_dim == 0:
            if isinstance(x, numbers.Integral) and not isinstance(x, bool):
                B = int(x)
            elif x is None:
                if batch is None:
                    raise ValueError("prepare: this energy has no context; pass the batch size (x=B)")
                B = batch
            elif isinstance(x, Tensor):
                if x.dim() != 2 or x.shape[1] != 0:
                    raise ValueError(f"prepare: x must be [B, 0] for context_dim=0; got shape {tuple(x.shape)}")
                B = x.shape[0]
            else:
                raise TypeError(f"prepare: x must be a tensor [B, 0] or an int B; got {type(x).__name__}")
            if B < 0:
                raise ValueError(f"prepare: the batch size must be >= 0; got {B}")
            with torch.no_grad():
                return ref.mlp_context(None, None, self._b_in(), B, self.hidden[0], w)
        plan = _dispatch.mlp_plan_lane(self, None)
        if plan is not None and _dispatch.eager_refusal(x) is None:
            # the plan's context term: the same addmm on the module's current weights, called without the Python
            # layers; None unless x fits the plan as it is (the checks below then raise or compute)
            c = plan.context(x)
            if c is not None:
                return c
        if not isinstance(x, Tensor):
            raise TypeError(f"prepare: x must be a tensor [B, context_dim={self.context_dim}]; got "
                            f"{type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.context_dim:
            raise ValueError(f"prepare: x must be [B, context_dim={self.context_dim}]; got {tuple(x.shape)}")
        if x.device != w.device or x.dtype != w.dtype:
            raise ValueError(f"prepare: x is {x.dtype} on {x.device} but the model is {w.dtype} on {w.device}")
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # no autograd graph; cheaper than the no_grad context manager
        try:
            return ref.mlp_context(x, self._w_x(), self._b_in(), x.shape[0], self.hidden[0], w)
        finally:
            torch._C._set_grad_enabled(prev)

    def _check_y(self, ctx, y) -> None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a tensor [B, K, candidate_dim={self.candidate_dim}]; got {type(y).__name__}")
        if not isinstance(ctx, Tensor):
            raise TypeError(f"ctx must be the tensor from prepare(x); got {type(ctx).__name__}")
        if y.dim() != 3 or y.shape[2] != self.candidate_dim:
            raise ValueError(f"y must be [B, K, candidate_dim={self.candidate_dim}]; got shape {tuple(y.shape)}")
        if ctx.dim() != 2 or ctx.shape[0] != y.shape[0] or ctx.shape[1] != self.hidden[0]:
            raise ValueError(f"ctx must be [B={y.shape[0]}, {self.hidden[0]}] (from prepare(x)); "
                             f"got shape {tuple(ctx.shape)}")

    def energy(self, ctx: Tensor, y: Tensor, backend: Optional[str] = None) -> Tensor:
        """E [B, K] for y [B, K, candidate_dim]."""
        plan = _dispatch.mlp_plan_lane(self, backend)
        if plan is not None:
            out = plan.energy(ctx, y)
            if out is not None:
                return out
        return self._fused("energy", ops.mlp_energy, ctx, y, backend)

    def energy_and_grad(self, ctx: Tensor, y: Tensor, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
        """(E [B, K], dE/dy [B, K, candidate_dim]) in one fused call."""
        plan = _dispatch.mlp_plan_lane(self, backend)
        if plan is not None:
            out = plan.energy_and_grad(ctx, y)
            if out is not None:
                return out
        return self._fused("energy_and_grad", ops.mlp_energy_grad, ctx, y, backend)

    def _fused(self, method: str, op, ctx, y, backend: Optional[str]):
        """The cpu plan's ``method`` when the dispatch table gives it the call (and it takes these inputs as
        they are), else the op ``op``; no autograd graph either way. Inside a torch.func transform the reference
        (plain PyTorch) computes it with the transform's autograd, so ``torch.func.grad`` of an energy call is
        its gradient, not the zero of a constant (the C++ autograd formulas of the ops do not run under
        torch.func)."""
        path = _dispatch.mlp_call(self, ctx, y, backend)
        if path == "plan":
            plan = self.cpu_plan()
            out = None if plan is None else getattr(plan, method)(ctx, y)
            if out is not None:
                return out
            # weights, shapes or dtypes the plan does not take as they are: the op computes, converts or raises
            path = "cpu"
        self._check_y(ctx, y)
        w_in, weights, biases, w_out, b_out = self.op_params()
        if _dispatch.in_functorch_transform():
            return _dispatch.functorch_call(
                lambda yy: ref.mlp_energy(ctx, yy, w_in, weights, biases, w_out, b_out, self.activation,
                                          self.residual), y, method == "energy_and_grad")
        prev = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # no autograd graph; cheaper than the no_grad context manager
        try:
            return op(ctx, y, w_in, weights, biases, w_out, b_out, self.activation, self.residual, backend=path)
        finally:
            torch._C._set_grad_enabled(prev)

    def explain_energy(self, ctx, y, backend: Optional[str] = None) -> str:
        """What an ``energy_and_grad`` call on these inputs runs (``pyebm.explain``)."""
        path = _dispatch.mlp_call(self, ctx, y, backend)
        if path == "plan":
            return "cpu plan: fused energy + gradient on packed weights, called without the dispatcher"
        if path == "torch":
            return "the reference (plain PyTorch autograd on y)"
        why = _dispatch.plan_refusal(self, ctx, y) if path == "cpu" else None
        return f"torch.ops.pyebm.mlp_energy_grad on {path}" + (f" (not the cpu plan: {why})" if why else "")

    # -- the whole descent loop (pyebm.protocol's whole-loop hook) ------------------------------
    def whole_loop_spec(self, dtype: torch.dtype) -> WholeLoopSpec:
        """What the whole-loop ops implement for candidates of ``dtype`` (``pyebm._dispatch`` decides)."""
        w = self._w_in()
        return _mlp_spec(dtype, w.dtype, w.is_cpu, self.context_dim > 0)

    def run_whole_loop(self, ctx, config, *, backend: str, y0: Tensor, mask, lower, upper, step_clip, generator,
                       final_energy: bool = True):
        """Every step of ``config`` in one op on ``backend`` ("cpu", "cuda", "triton"):
        (y, E_final, E_init, steps, status). The final energy pass always runs (the op's last phase)."""
        return _mlp_descent.run(self, ctx, config, y0=y0, mask=mask, lower=lower, upper=upper, step_clip=step_clip,
                                generator=generator, backend=backend)

    def run_one_call(self, context: Tensor, config, *, y0: Tensor, generator, final_energy: bool = True):
        """The context term, every step and the selection in one call of the cpu plan: (y, E, E_init, steps,
        status, best, best_energy, best_index). The plan always runs the final energy pass: with
        ``final_energy=False`` (one candidate) E and best_energy are None."""
        plan = self.cpu_plan()
        dtype = context.dtype
        B, K, D = y0.shape
        rule = plan_rule(config, dtype, (D,))
        noise = None
        if config.noise != "none":  # one draw of y's shape per step: the order of the per-step path
            noise = torch.empty((config.steps, B, K, D), dtype=dtype)
            for k in range(config.steps):
                noise[k].normal_(generator=generator)
        out = plan.descent(context, y0, rule, noise)
        if out is None:
            self.prepare(context)  # raises the error for a context that does not fit
            raise RuntimeError(f"pyebm: the cpu plan did not take the descent of candidates {tuple(y0.shape)} "
                               f"{y0.dtype} for a context {tuple(context.shape)} {dtype}")
        if not final_energy:
            y, _, E0, steps, status, best, _, idx = out
            return y, None, E0, steps, status, best, None, idx
        return out

    # -- training -----------------------------------------------------------------------------
    def forward(self, x: Optional[Tensor], y: Tensor) -> Tensor:
        """Differentiable E: y [B, K, D] -> [B, K], or y [B, D] -> [B]. Plain autograd (training)."""
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a tensor [B, K, {self.candidate_dim}]; got {type(y).__name__}")
        squeeze = y.dim() == 2
        if squeeze:
            y = y.unsqueeze(1)
        if y.dim() != 3 or y.shape[2] != self.candidate_dim:
            raise ValueError(f"y must be [B, K, {self.candidate_dim}] or [B, {self.candidate_dim}]; "
                             f"got shape {tuple(y.shape)}")
        B = y.shape[0]
        if self.context_dim > 0:
            if not isinstance(x, Tensor) or x.dim() != 2 or x.shape != (B, self.context_dim):
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"x must be [B={B}, context_dim={self.context_dim}]; got {shape}")
            ctx = ref.mlp_context(x, self._w_x(), self._b_in(), B, self.hidden[0], y)
        else:
            ctx = ref.mlp_context(None, None, self._b_in(), B, self.hidden[0], y)
        w_in, weights, biases, w_out, b_out = self.op_params()
        E = ref.mlp_energy(ctx, y, w_in, weights, biases, w_out, b_out, self.activation, self.residual)
        return E.squeeze(1) if squeeze else E


# -- whole-loop support ----------------------------------------------------------------------------

_SPECS: dict = {}


def _triton_descent() -> bool:
    hit = _SPECS.get("triton")
    if hit is None:
        try:
            from pyebm.ops import descent_triton  # noqa: F401
            hit = hasattr(torch.ops.pyebm, "mlp_descent_triton") and _backend.triton is not None
        except ImportError:
            hit = False
        _SPECS["triton"] = hit
    return hit


def _mlp_spec(dtype, weight_dtype, weights_on_cpu: bool, has_context: bool) -> WholeLoopSpec:
    key = (dtype, weight_dtype, weights_on_cpu, has_context)
    spec = _SPECS.get(key)
    if spec is not None:
        return spec
    backends = []
    if _mlp_descent.HAS_OP and dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        backends += ["cpu", "cuda"]
    if dtype in (torch.float32, torch.bfloat16, torch.float16) and _triton_descent():
        backends.append("triton")
    one_call, why = (), None
    if _MlpPlan is None or _DescentRule is None:
        why = "the compiled extension is not available"
    elif not weights_on_cpu or weight_dtype not in _dispatch.PLAN_DTYPES:
        why = (f"the cpu plan takes float32/float64 CPU weights; the model's are {weight_dtype}"
               + ("" if weights_on_cpu else " on another device"))
    elif dtype != weight_dtype:
        why = f"{dtype} context but {weight_dtype} weights"
    elif not has_context:
        why = "the energy has no context (context_dim=0)"
    else:
        one_call = ("cpu",)
    spec = _SPECS[key] = WholeLoopSpec(backends=tuple(backends), noise=_WHOLE_LOOP_NOISE, mask=True,
                                       dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                                       one_call=one_call, one_call_why=why)
    return spec


_RULES: dict = {}


def plan_rule(cfg, dtype: torch.dtype, event: Tuple[int, ...]):
    """The compiled update rule (``pyebm._C.DescentRule``) of ``cfg`` for candidates [..., *event] of ``dtype``
    (bounds and step clip flattened to the event's size), built once per config object (held, so that its id
    is not reused)."""
    entry = _RULES.get(id(cfg))
    if entry is None or entry[0] is not cfg:
        if len(_RULES) >= 256:
            _RULES.clear()
        entry = _RULES[id(cfg)] = (cfg, {})
    rules = entry[1]
    rule = rules.get((dtype, event))
    if rule is None:
        from pyebm.config import event_option

        opts = [event_option(name, getattr(cfg, name), event, "cpu", dtype) for name in ("lower", "upper", "step_clip")]
        opts = [None if t is None else t.reshape(-1) for t in opts]
        eta, nlev = schedules(cfg)
        rule = rules[(dtype, event)] = _DescentRule(eta=eta.tolist(), noise_level=nlev.tolist(), **rule_options(cfg),
                                                    lower=opts[0], upper=opts[1], step_clip=opts[2],
                                                    selection=cfg.selection)
    return rule
