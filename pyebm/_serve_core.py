"""Request handling of ``pyebm serve`` without Ray: parsing and checking requests, and running a batch of
them as one ``act()`` (``PolicyServer``, for a saved policy), one ``pyebm.minimize`` (``EnergyServer``, for
a bare energy saved with its inference configuration) or one ``EBT.generate`` / ``EBT.think`` (``EBTServer``,
for a saved EBT). ``pyebm.serving`` builds the Ray Serve application around them (``make_server`` picks the
one a directory needs)."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from pyebm import _dtypes

_POLICIES = ("EnergyPolicy", "PolicyAdapter")
_ENERGIES = ("MLPEnergy", "EBT", "EBTPolicy")
_FIELDS = ("observation", "seed")
_ENERGY_FIELDS = ("context", "init", "seed")
_MAX_SEED = 2 ** 63


class RequestError(ValueError):
    """A request the server refuses: ``status`` is the HTTP status (400), the message the reason."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Item:
    """One checked request: its observation (on the policy's device, in its dtype) and its seed."""

    observation: Tensor
    seed: Optional[int]


@dataclass
class EnergyItem:
    """One checked request to an ``EnergyServer``: its context (on the energy's device), its initial
    candidates ([K, *event] or [*event], or None: drawn from the seed) and its seed."""

    context: Tensor
    init: Optional[Tensor]
    seed: Optional[int]


def _shape_of(value, where: str) -> Tuple[int, ...]:
    """The shape of nested lists of numbers; RequestError for anything else (ragged, empty, non-numbers)."""
    if isinstance(value, bool) or value is None:
        raise RequestError(f"{where} must be a number; got {'null' if value is None else str(value).lower()}")
    if isinstance(value, numbers.Real):
        return ()
    if not isinstance(value, list):
        raise RequestError(f"{where} must be a number or a list; got {type(value).__name__} {value!r:.40}")
    if not value:
        raise RequestError(f"{where} is an empty list")
    shapes = [_shape_of(v, f"{where}[{i}]") for i, v in enumerate(value)]
    for i, s in enumerate(shapes):
        if s != shapes[0]:
            raise RequestError(f"{where} is ragged: {where}[0] has shape {list(shapes[0])}, {where}[{i}] has "
                               f"shape {list(s)}")
    return (len(value),) + shapes[0]


def _seed_of(payload: Dict[str, Any]) -> Optional[int]:
    seed = payload.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed < _MAX_SEED):
        raise RequestError(f"seed must be an int in [0, 2**63) or absent; got {seed!r:.40}")
    return None if seed is None else int(seed)


def _floats(value, shape: Tuple[int, ...], name: str, dtype: torch.dtype) -> Tensor:
    """Nested lists of numbers (already of ``shape``) as a finite tensor of ``dtype``."""
    t = torch.tensor(value, dtype=torch.float64).to(dtype)
    if not bool(torch.isfinite(t).all()):
        raise RequestError(f"{name} contains NaN, Inf or a number too large for {dtype}")
    return t


class _Server:
    """What the servers share: a batch of checked requests served one group (one key) at a time; a group
    whose call fails is served again one request at a time, so that only the failing request gets the error."""

    route = ""

    @property
    def routes(self) -> Tuple[str, ...]:
        """The POST routes the server answers (the first is ``route``)."""
        return (self.route,)

    def parse(self, payload: Any, route: Optional[str] = None):
        raise NotImplementedError

    def parse_route(self, route: str, payload: Any):
        """``parse`` of a request to ``route`` (one of ``routes``)."""
        if route not in self.routes:
            raise self._no_route(route)
        return self.parse(payload, route)

    def _no_route(self, route: str) -> RequestError:
        """The HTTP 404 error of a request to a route the server does not answer."""
        return RequestError(f"no route /{route}; " + " or ".join(f"POST /{r}" for r in self.routes), 404)

    def _key(self, item) -> tuple:
        raise NotImplementedError

    def _serve(self, items: Sequence[Any]) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def run(self, items: Sequence[Any]) -> List[Union[Dict[str, Any], RequestError]]:
        """One answer per item, in order: a response dict or a ``RequestError``. Items of one key (the shape of
        the observation or context) are served by one call; when it fails, each of its items is run alone."""
        out: List[Any] = [None] * len(items)
        groups: Dict[tuple, List[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(self._key(it), []).append(i)
        for idx in groups.values():
            try:
                answers = self._serve([items[i] for i in idx])
            except Exception as e:  # noqa: BLE001 -- find the failing item(s): each one again alone
                if len(idx) == 1:
                    answers = [_as_error(e)]
                else:
                    answers = []
                    for i in idx:
                        try:
                            answers.extend(self._serve([items[i]]))
                        except Exception as e1:  # noqa: BLE001
                            answers.append(_as_error(e1))
            for i, a in zip(idx, answers):
                out[i] = a
        return out


class PolicyServer(_Server):
    """The request handling of ``pyebm serve`` without Ray: check one request (``parse``), serve a batch of
    checked requests (``run``). The Ray Serve deployment of ``build_app`` holds one per replica.

    Args:
        model_dir: a directory written by ``save_pretrained`` of an EnergyPolicy or a PolicyAdapter.
        device: where the weights live and ``act`` runs ("cpu", "cuda", "cuda:1", ...).
    """

    route = "act"

    def __init__(self, model_dir: "str | os.PathLike", device: Union[str, torch.device] = "cpu"):
        from pyebm.adapter import PolicyAdapter
        from pyebm.policies import EnergyPolicy
        from pyebm.pretrained import from_pretrained

        if _check_model_dir(model_dir) != "policy":
            raise ValueError(f"PolicyServer: {os.fspath(model_dir)!r} holds a bare energy; EnergyServer serves it "
                             "(pyebm.serving.make_server picks the server a directory needs)")
        self.device = torch.device(device)
        obj = from_pretrained(model_dir, device=self.device)
        if isinstance(obj, PolicyAdapter):
            self.adapter, self.policy = obj, obj.policy
        elif isinstance(obj, EnergyPolicy):
            self.adapter, self.policy = None, obj
        else:  # _check_model_dir refused the others already
            raise ValueError(f"pyebm serve: {type(obj).__name__} is not a policy")
        self.model_dir = os.fspath(model_dir)
        self.architecture = type(obj).__name__
        floats = [t for t in list(getattr(self.policy.energy, "parameters", lambda: [])())
                  if t.is_floating_point()]
        self.dtype = floats[0].dtype if floats else torch.get_default_dtype()

    # -- what the server accepts --------------------------------------------------------------------
    def observation_shapes(self) -> List[str]:
        """The accepted shapes of one observation, in words."""
        p = self.policy
        if p.flat:
            cdim = p.energy.context_dim
            return [f"[{p.n_obs_steps}, {cdim // p.n_obs_steps}] (n_obs_steps, obs_dim)", f"[{cdim}] (context_dim)"]
        cond = getattr(p.energy, "cond_dim", None)
        return [f"[L, {'cond_dim' if cond is None else cond}] (observation tokens, L a multiple of "
                f"n_obs_steps = {p.n_obs_steps})"]

    def _shape_ok(self, shape: Tuple[int, ...]) -> bool:
        p = self.policy
        if p.flat:
            cdim = p.energy.context_dim
            return shape == (cdim,) or shape == (p.n_obs_steps, cdim // p.n_obs_steps)
        cond = getattr(p.energy, "cond_dim", None)
        return len(shape) == 2 and shape[0] % p.n_obs_steps == 0 and (cond is None or shape[1] == cond)

    def info(self) -> Dict[str, Any]:
        """What ``GET /info`` answers: the model, the accepted observation shapes and the action shape."""
        p = self.policy
        steps = p.n_action_steps if self.adapter is None else self.adapter.n_action_steps
        return {"model_dir": self.model_dir, "architecture": self.architecture, "energy": type(p.energy).__name__,
                "route": "/act", "observation_shapes": self.observation_shapes(),
                "action_shape": [steps, p.action_dim], "candidates": p.candidates,
                "dtype": _dtypes.name(self.dtype), "device": str(self.device)}

    def example_request(self, generator: torch.Generator) -> Dict[str, Any]:
        """A valid request with a random observation (``pyebm bench serve``)."""
        p = self.policy
        if p.flat:
            shape = (p.n_obs_steps, p.energy.context_dim // p.n_obs_steps)
        else:
            shape = (p.n_obs_steps, getattr(p.energy, "cond_dim", 1))
        return {"observation": torch.randn(shape, generator=generator, dtype=torch.float64).tolist()}

    # -- one request ---------------------------------------------------------------------------------
    def parse(self, payload: Any, route: Optional[str] = None) -> Item:
        """The checked request; ``RequestError`` (HTTP 400) with the reason for a bad one."""
        if not isinstance(payload, dict):
            raise RequestError(f"the request must be a JSON object {{\"observation\": [...], \"seed\": int}}; got "
                               f"{type(payload).__name__}")
        unknown = sorted(set(payload) - set(_FIELDS))
        if unknown:
            raise RequestError(f"unknown fields {unknown}; a request has \"observation\" and optionally \"seed\"")
        if "observation" not in payload:
            raise RequestError("the request has no \"observation\" field")
        seed = _seed_of(payload)
        value = payload["observation"]
        shape = _shape_of(value, "observation")
        if not self._shape_ok(shape):
            raise RequestError(f"observation has shape {list(shape)}; this policy takes one observation of shape "
                               + " or ".join(self.observation_shapes()))
        obs = _floats(value, shape, "observation", self.dtype).to(self.device)
        try:  # the policy's own checks, on a batch of one (cheap: shapes and finiteness)
            batch = self.policy._context(obs.unsqueeze(0), check_finite=False)
            if self.adapter is not None:
                self.adapter.normalize_observation(obs.unsqueeze(0))
        except (TypeError, ValueError) as e:
            raise RequestError(f"observation: {e}") from None
        del batch
        return Item(observation=obs, seed=seed)

    # -- a batch of checked requests -----------------------------------------------------------------
    def _key(self, item: Item) -> tuple:
        return tuple(item.observation.shape)

    def _serve(self, items: Sequence[Item]) -> List[Dict[str, Any]]:
        return self._act(items)

    def _act(self, items: Sequence[Item]) -> List[Dict[str, Any]]:
        policy, device, dtype = self.policy, self.device, self.dtype
        obs = torch.stack([it.observation for it in items])
        if self.adapter is not None:
            obs = self.adapter.normalize_observation(obs)
        inits, batch_generator = [], None
        for it in items:
            g = None if it.seed is None else torch.Generator(device=device).manual_seed(it.seed)
            inits.append(policy._fresh(1, policy.descent, g, device, dtype))
            if batch_generator is None:
                batch_generator = g
        actions = policy.act(obs, init=torch.cat(inits), generator=None if policy.cuda_graph else batch_generator)
        energy = policy.last_result.best_energy if policy.last_result is not None else None
        if self.adapter is not None:
            actions = self.adapter.unnormalize_action(actions[:, :self.adapter.n_action_steps])
        actions = actions.detach().to("cpu", torch.float64).tolist()
        energy = None if energy is None else energy.detach().to("cpu", torch.float64).tolist()
        return [{"actions": actions[i], "energy": None if energy is None else _json_number(energy[i]),
                 "batch_size": len(items), "seed": it.seed} for i, it in enumerate(items)]


def _json_number(x: float):
    return x if math.isfinite(x) else str(x)  # JSON has no NaN/Inf: "nan", "inf", "-inf"


def _as_error(e: BaseException) -> RequestError:
    if isinstance(e, RequestError):
        return e
    if isinstance(e, (TypeError, ValueError)):
        return RequestError(str(e), 400)
    return RequestError(f"{type(e).__name__}: {e}", 500)


def _check_model_dir(model_dir) -> str:
    """"policy", "ebt" or "energy": what ``model_dir`` holds; FileNotFoundError / ValueError unless it holds a
    saved EnergyPolicy or PolicyAdapter, an EBT, or another bare energy saved with its inference configuration."""
    from pyebm.pretrained import _read_config, inference_config

    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"pyebm serve: model_dir must be a path; got {type(model_dir).__name__}")
    path = os.fspath(model_dir)
    name = _read_config(path).get("architecture")
    if name in _POLICIES:
        return "policy"
    if name == "EBT":
        inference_config(path)  # checks the "inference" entry (its "ebt" defaults included)
        return "ebt"
    if name in _ENERGIES:
        if inference_config(path) is None:
            raise ValueError(f"pyebm serve: {path!r} holds a {name} saved without an inference configuration; save "
                             "it with save_pretrained(dir, descent=pyebm.Descent(...), candidates=K) (the server "
                             "runs pyebm.minimize with them), or wrap it in pyebm.policies.EnergyPolicy and save that")
        return "energy"
    raise ValueError(f"pyebm serve: {path!r} holds {name!r}; the server runs an EnergyPolicy, a PolicyAdapter, or "
                     f"a bare energy ({', '.join(_ENERGIES)}) saved with descent= and candidates=")


def model_routes(model_dir: "str | os.PathLike") -> List[str]:
    """The POST routes ``pyebm serve`` answers for ``model_dir`` (without loading its weights)."""
    from pyebm.pretrained import inference_config

    kind = _check_model_dir(model_dir)
    if kind == "policy":
        return ["act"]
    if kind == "energy":
        return ["minimize"]
    return ["generate", "think"] + (["minimize"] if inference_config(model_dir) is not None else [])


def make_server(model_dir: "str | os.PathLike", device: Union[str, torch.device] = "cpu") -> "_Server":
    """The server for what ``model_dir`` holds: a ``PolicyServer`` for a saved policy or adapter, an
    ``EBTServer`` for an EBT, an ``EnergyServer`` for another bare energy saved with its inference
    configuration."""
    kind = _check_model_dir(model_dir)
    if kind == "policy":
        return PolicyServer(model_dir, device=device)
    if kind == "ebt":
        return EBTServer(model_dir, device=device)
    return EnergyServer(model_dir, device=device)


class EnergyServer(_Server):
    """The request handling of ``pyebm serve`` for a bare energy (an ``MLPEnergy``, ``EBT`` or ``EBTPolicy``
    saved with ``save_pretrained(dir, descent=..., candidates=K)``): each request gives one context, and a
    batch of requests is one ``pyebm.minimize(energy, contexts, K, descent, init=...)``.

    Args:
        model_dir: the directory.
        device: where the weights live and ``minimize`` runs.
    """

    route = "minimize"

    def __init__(self, model_dir: "str | os.PathLike", device: Union[str, torch.device] = "cpu"):
        from pyebm.config import event_option
        from pyebm.descent import _event_shape_of
        from pyebm.pretrained import from_pretrained, inference_config

        kind = _check_model_dir(model_dir)
        if kind == "policy":
            raise ValueError(f"EnergyServer: {os.fspath(model_dir)!r} holds a policy; PolicyServer serves it "
                             "(pyebm.serving.make_server picks the server a directory needs)")
        saved = inference_config(model_dir)
        if saved is None:  # an EBT saved without descent= and candidates= (EBTServer serves its generate / think)
            raise ValueError(f"EnergyServer: {os.fspath(model_dir)!r} holds an EBT saved without an inference "
                             "configuration for minimize (descent= and candidates=); EBTServer serves its "
                             "/generate and /think")
        self.device = torch.device(device)
        self.energy = from_pretrained(model_dir, device=self.device)
        self.descent, self.candidates = saved
        self.model_dir = os.fspath(model_dir)
        self.architecture = type(self.energy).__name__
        self.event = tuple(_event_shape_of(self.energy))
        floats = [t for t in self.energy.parameters() if t.is_floating_point()]
        self.dtype = floats[0].dtype if floats else torch.get_default_dtype()
        cfg = self.descent
        self.lower = event_option("lower", cfg.lower, self.event, self.device, self.dtype)
        self.upper = event_option("upper", cfg.upper, self.event, self.device, self.dtype)

    # -- what the server accepts --------------------------------------------------------------------
    def context_shapes(self) -> List[str]:
        """The accepted shapes of one context, in words."""
        e = self.energy
        if self.architecture == "MLPEnergy":
            return [f"[{e.context_dim}] (context_dim)"]
        if self.architecture == "EBTPolicy":
            return [f"[L, {e.cond_dim}] (observation tokens, L a multiple of n_obs_steps = {e.n_obs_steps})"]
        return [f"[S] (token ids in [0, {e.config.vocab_size}), 1 <= S <= {e.config.context_length})"]

    def info(self) -> Dict[str, Any]:
        """What ``GET /info`` answers: the model, the accepted shapes, the inference configuration."""
        ev = list(self.event)
        return {"model_dir": self.model_dir, "architecture": self.architecture, "route": "/minimize",
                "context_shapes": self.context_shapes(),
                "init_shapes": [str(ev), str([self.candidates] + ev)], "y_shape": ev,
                "candidates": self.candidates, "descent": self.descent.to_dict(),
                "dtype": _dtypes.name(self.dtype), "device": str(self.device)}

    def example_request(self, generator: torch.Generator) -> Dict[str, Any]:
        """A valid request with a random context (``pyebm bench serve``)."""
        e = self.energy
        if self.architecture == "MLPEnergy":
            return {"context": torch.randn(e.context_dim, generator=generator, dtype=torch.float64).tolist()}
        if self.architecture == "EBTPolicy":
            return {"context": torch.randn(e.n_obs_steps, e.cond_dim, generator=generator,
                                           dtype=torch.float64).tolist()}
        S = min(8, e.config.context_length)
        return {"context": torch.randint(0, e.config.vocab_size, (S,), generator=generator).tolist()}

    # -- one request ---------------------------------------------------------------------------------
    def _context(self, value) -> Tensor:
        shape = _shape_of(value, "context")
        e, name = self.energy, self.architecture
        if name == "EBT":
            try:
                t = torch.tensor(value)
            except (OverflowError, RuntimeError, TypeError):
                t = None
            if t is None or t.dtype != torch.int64 or len(shape) != 1:
                raise RequestError(f"context must be token ids (ints) of shape {self.context_shapes()[0]}; got "
                                   f"shape {list(shape)}" + ("" if t is None or t.dtype == torch.int64
                                                             else " with non-integer values"))
            try:
                return e._check_tokens(t[None], what="context")[0]
            except (TypeError, ValueError) as err:
                raise RequestError(str(err)) from None
        if name == "MLPEnergy":
            if shape != (e.context_dim,):
                raise RequestError(f"context has shape {list(shape)}; this energy takes one context of shape "
                                   f"{self.context_shapes()[0]}")
            return _floats(value, shape, "context", self.dtype).to(self.device)
        if len(shape) != 2 or shape[1] != e.cond_dim or shape[0] % e.n_obs_steps != 0:
            raise RequestError(f"context has shape {list(shape)}; this energy takes one context of shape "
                               f"{self.context_shapes()[0]}")
        return _floats(value, shape, "context", self.dtype).to(self.device)

    def parse(self, payload: Any, route: Optional[str] = None) -> EnergyItem:
        """The checked request; ``RequestError`` (HTTP 400) with the reason for a bad one."""
        if not isinstance(payload, dict):
            raise RequestError(f"the request must be a JSON object {{\"context\": [...], \"init\": [...], "
                               f"\"seed\": int}}; got {type(payload).__name__}")
        unknown = sorted(set(payload) - set(_ENERGY_FIELDS))
        if unknown:
            raise RequestError(f"unknown fields {unknown}; a request has \"context\" and optionally \"init\" "
                               "and \"seed\"")
        if "context" not in payload:
            raise RequestError("the request has no \"context\" field")
        seed = _seed_of(payload)
        context = self._context(payload["context"])
        init = payload.get("init")
        if init is not None:
            shape = _shape_of(init, "init")
            K, ev = self.candidates, self.event
            if shape != ev and shape != (K,) + ev:
                raise RequestError(f"init has shape {list(shape)}; expected {list(ev)} (shared by the {K} "
                                   f"candidates) or {[K] + list(ev)}")
            init = _floats(init, shape, "init", self.dtype).to(self.device)
        return EnergyItem(context=context, init=init, seed=seed)

    # -- a batch of checked requests -----------------------------------------------------------------
    def _key(self, item: EnergyItem) -> tuple:
        return tuple(item.context.shape)

    def _initial(self, item: EnergyItem, generator) -> Tensor:
        """[1, K, *event]: the request's init, or the candidates ``minimize(energy, context[None], K, descent,
        generator=seed)`` draws first (the same function, shape, bounds and generator)."""
        from pyebm.descent import initial

        K, ev = self.candidates, self.event
        if item.init is not None:
            return item.init.expand((K,) + ev).unsqueeze(0)
        return initial(self.descent.init, self.descent, (1, K) + ev, self.lower, self.upper, generator,
                       self.device, self.dtype)

    def _serve(self, items: Sequence[EnergyItem]) -> List[Dict[str, Any]]:
        from pyebm.descent import minimize

        device = self.device
        contexts = torch.stack([it.context for it in items])
        inits, batch_generator = [], None
        for it in items:
            g = None if it.seed is None else torch.Generator(device=device).manual_seed(it.seed)
            inits.append(self._initial(it, g))
            if batch_generator is None:
                batch_generator = g
        res = minimize(self.energy, contexts, self.candidates, self.descent, init=torch.cat(inits).contiguous(),
                       generator=batch_generator)
        best = res.best.detach().to("cpu", torch.float64).tolist()
        energy = res.best_energy.detach().to("cpu", torch.float64).tolist()
        index = res.best_index.tolist()
        return [{"y": best[i], "energy": _json_number(energy[i]), "index": index[i], "batch_size": len(items),
                 "seed": it.seed} for i, it in enumerate(items)]


# -- EBT: POST /generate, POST /think ---------------------------------------------------------------------

_GENERATE_FIELDS = ("prompt", "max_new_tokens", "seed", "temperature", "top_p", "eos_token_id", "steps", "alpha",
                    "noise", "samples", "select", "accept_lower")
_THINK_FIELDS = ("context", "seed", "steps", "alpha", "noise", "samples", "select", "accept_lower", "top_k",
                 "full_logits")
_THINK_OPTIONS = ("steps", "alpha", "noise", "samples", "select", "accept_lower")
_GENERATE_OPTIONS = _THINK_OPTIONS + ("temperature", "top_p", "eos_token_id")


@dataclass
class GenerateItem:
    """One checked ``POST /generate`` request: its prompt ([S] token ids on the model's device), how many tokens
    to generate, its options (the directory's ``EBTInference`` with the request's values) and its seed."""

    prompt: Tensor
    max_new_tokens: int
    options: Any
    seed: Optional[int]


@dataclass
class ThinkItem:
    """One checked ``POST /think`` request: its context ([S] token ids), options, how many of the most probable
    tokens to report (``top_k``), whether to report every logit, and its seed."""

    context: Tensor
    options: Any
    top_k: int
    full_logits: bool
    seed: Optional[int]


class EBTServer(_Server):
    """The request handling of ``pyebm serve`` for a saved ``EBT``: ``POST /generate`` runs ``EBT.generate``,
    ``POST /think`` runs ``EBT.think`` on the next position, and, when the directory was saved with
    ``descent=`` and ``candidates=``, ``POST /minimize`` runs ``pyebm.minimize`` as ``EnergyServer`` does.

    The options a request leaves out are the directory's (``model.inference``, an ``EBTInference`` saved with
    ``save_pretrained(dir, inference=...)``; the built-in defaults for a directory without one). Requests of
    one route, prompt length, ``max_new_tokens`` (generate) and options are served by one call on the stacked
    prompts, with one generator per prompt (``generator=[seed, ...]``): each prompt draws exactly what a call on
    it alone with its seed draws.

    Args:
        model_dir: a directory written by ``EBT.save_pretrained``.
        device: where the weights live and the calls run.
        max_steps, max_samples: the largest ``steps`` and ``samples`` a request may ask for (raised to the
            directory's own defaults when those are larger).
        max_new_tokens: the most tokens one request may generate (default: ``context_length``; a prompt of S
            tokens can get at most ``context_length - S + 1``).
    """

    route = "generate"

    def __init__(self, model_dir: "str | os.PathLike", device: Union[str, torch.device] = "cpu", *,
                 max_steps: int = 64, max_samples: int = 64, max_new_tokens: Optional[int] = None):
        from pyebm.models.ebt import EBT
        from pyebm.pretrained import from_pretrained, inference_config

        if _check_model_dir(model_dir) != "ebt":
            raise ValueError(f"EBTServer: {os.fspath(model_dir)!r} does not hold an EBT (pyebm.serving.make_server "
                             "picks the server a directory needs)")
        for name, v in (("max_steps", max_steps), ("max_samples", max_samples), ("max_new_tokens", max_new_tokens)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"EBTServer: {name} must be an int >= 1; got {v!r}")
        self.device = torch.device(device)
        self.model_dir = os.fspath(model_dir)
        if inference_config(model_dir) is not None:  # /minimize too, on the same model
            self.minimizer: Optional[EnergyServer] = EnergyServer(model_dir, device=self.device)
            self.model = self.minimizer.energy
        else:
            self.minimizer = None
            self.model = from_pretrained(model_dir, device=self.device)
        if not isinstance(self.model, EBT):  # _check_model_dir refused the others already
            raise ValueError(f"EBTServer: {type(self.model).__name__} is not an EBT")
        self.architecture = "EBT"
        self.defaults = self.model.inference
        self.dtype = self.model._param.dtype
        cfg = self.model.config
        self.vocab_size, self.context_length = cfg.vocab_size, cfg.context_length
        self.max_steps = max(max_steps, self.defaults.steps or 0)
        self.max_samples = max(max_samples, self.defaults.samples)
        self.max_new_tokens = self.context_length if max_new_tokens is None else max_new_tokens

    @property
    def routes(self) -> Tuple[str, ...]:
        return ("generate", "think") + (("minimize",) if self.minimizer is not None else ())

    # -- what the server accepts --------------------------------------------------------------------
    def info(self) -> Dict[str, Any]:
        """What ``GET /info`` answers: the model, the routes, their fields, the defaults and the limits."""
        cfg = self.model.config
        out = {"model_dir": self.model_dir, "architecture": self.architecture, "route": "/generate",
               "routes": [f"/{r}" for r in self.routes], "vocab_size": cfg.vocab_size,
               "context_length": cfg.context_length, "ebt_type": cfg.ebt_type,
               "generate_fields": list(_GENERATE_FIELDS), "think_fields": list(_THINK_FIELDS),
               "inference": self.defaults.to_dict(),
               "limits": {"max_new_tokens": self.max_new_tokens, "max_steps": self.max_steps,
                          "max_samples": self.max_samples, "max_top_k": cfg.vocab_size},
               "dtype": _dtypes.name(self.dtype), "device": str(self.device)}
        if self.minimizer is not None:
            m = self.minimizer
            out["minimize"] = {"context_shapes": m.context_shapes(), "candidates": m.candidates,
                               "descent": m.descent.to_dict()}
        return out

    def example_request(self, generator: torch.Generator) -> Dict[str, Any]:
        """A valid ``POST /generate`` request with a random prompt (``pyebm bench serve``)."""
        S = min(8, self.context_length)
        n = max(1, min(8, self.context_length - S + 1, self.max_new_tokens))
        return {"prompt": torch.randint(0, self.vocab_size, (S,), generator=generator).tolist(), "max_new_tokens": n}

    # -- one request ---------------------------------------------------------------------------------
    def _tokens(self, value, name: str) -> Tensor:
        V, C = self.vocab_size, self.context_length
        if not isinstance(value, list) or not value:
            raise RequestError(f"{name} must be a non-empty list of token ids (ints in [0, {V})); got "
                               + ("an empty list" if isinstance(value, list) else f"{type(value).__name__} "
                                  f"{value!r:.40}"))
        for i, t in enumerate(value):
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise RequestError(f"{name}[{i}] must be a token id (an int); got {t!r:.40}")
            if not 0 <= t < V:
                raise RequestError(f"{name}[{i}] = {t} is not a token id: ids are in [0, vocab_size={V})")
        if len(value) > C:
            raise RequestError(f"{name} has {len(value)} tokens; this model's context_length is {C}")
        return torch.tensor(value, dtype=torch.long, device=self.device)

    def _options(self, payload: Dict[str, Any], names: Sequence[str]):
        """The directory's defaults with the request's values of ``names`` (null: the default)."""
        import dataclasses

        given = {k: payload[k] for k in names if payload.get(k) is not None}
        if "accept_lower" in given and not isinstance(given["accept_lower"], bool):
            raise RequestError(f"accept_lower must be true or false; got {given['accept_lower']!r:.40}")
        try:
            options = dataclasses.replace(self.defaults, **given)
        except (TypeError, ValueError) as e:
            raise RequestError(str(e).replace("EBTInference: ", "")) from None
        if "steps" in given and options.steps > self.max_steps:
            raise RequestError(f"steps must be at most {self.max_steps} on this server; got {options.steps}")
        if "samples" in given and options.samples > self.max_samples:
            raise RequestError(f"samples must be at most {self.max_samples} on this server; got {options.samples}")
        eos = options.eos_token_id
        if "eos_token_id" in given and eos >= self.vocab_size:
            raise RequestError(f"eos_token_id = {eos} is not a token id: ids are in [0, vocab_size={self.vocab_size})")
        return options

    def _check_fields(self, payload, fields: Sequence[str], required: Sequence[str], route: str) -> None:
        if not isinstance(payload, dict):
            raise RequestError(f"the request must be a JSON object with {', '.join(repr(f) for f in required)}; "
                               f"got {type(payload).__name__}")
        unknown = sorted(set(payload) - set(fields))
        if unknown:
            raise RequestError(f"unknown fields {unknown}; POST /{route} takes {list(fields)}")
        for f in required:
            if f not in payload:
                raise RequestError(f"the request has no \"{f}\" field")
        if payload.get("seed") is not None and self.model.cuda_graph:
            raise RequestError("seed: this model replays CUDA graphs (cuda_graph=True), which draw from the default "
                               "CUDA generator; send requests without a seed")

    def parse(self, payload: Any, route: Optional[str] = None):
        """The checked request to ``route`` ("generate" by default, "think", or "minimize" when the directory
        has a descent); ``RequestError`` (HTTP 400) with the reason for a bad one."""
        route = self.route if route is None else route
        if route == "minimize":
            if self.minimizer is None:
                raise RequestError("no route /minimize: this EBT was saved without descent= and candidates=", 404)
            return self.minimizer.parse(payload)
        if route == "think":
            return self._parse_think(payload)
        if route != "generate":
            raise self._no_route(route)
        self._check_fields(payload, _GENERATE_FIELDS, ("prompt", "max_new_tokens"), "generate")
        seed = _seed_of(payload)
        prompt = self._tokens(payload["prompt"], "prompt")
        n = payload["max_new_tokens"]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise RequestError(f"max_new_tokens must be an int >= 1; got {n!r:.40}")
        S, C = prompt.numel(), self.context_length
        if n > self.max_new_tokens:
            raise RequestError(f"max_new_tokens must be at most {self.max_new_tokens} on this server; got {n}")
        if S + n - 1 > C:
            raise RequestError(f"max_new_tokens = {n} after a prompt of {S} tokens exceeds context_length={C} (at "
                               f"most {C - S + 1} for this prompt)")
        options = self._options(payload, _GENERATE_OPTIONS)
        return GenerateItem(prompt=prompt, max_new_tokens=int(n), options=options, seed=seed)

    def _parse_think(self, payload: Any) -> ThinkItem:
        self._check_fields(payload, _THINK_FIELDS, ("context",), "think")
        seed = _seed_of(payload)
        context = self._tokens(payload["context"], "context")
        top_k = payload.get("top_k")
        top_k = min(5, self.vocab_size) if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= self.vocab_size:
            raise RequestError(f"top_k must be an int in [1, vocab_size={self.vocab_size}]; got {top_k!r:.40}")
        full = payload.get("full_logits", False)
        if not isinstance(full, bool):
            raise RequestError(f"full_logits must be true or false; got {full!r:.40}")
        options = self._options(payload, _THINK_OPTIONS)
        return ThinkItem(context=context, options=options, top_k=int(top_k), full_logits=full, seed=seed)

    # -- a batch of checked requests -----------------------------------------------------------------
    def _key(self, item) -> tuple:
        if isinstance(item, GenerateItem):
            o = item.options.generate_kwargs()
            if o["temperature"] == 0:
                o["top_p"] = None  # greedy: top_p is not used
            return ("generate", item.prompt.numel(), item.max_new_tokens) + tuple(sorted(o.items()))
        if isinstance(item, ThinkItem):
            return ("think", item.context.numel()) + tuple(sorted(item.options.think_kwargs().items()))
        return ("minimize",) + self.minimizer._key(item)

    def _generators(self, items) -> Optional[list]:
        """One seed (or None: torch's global generator) per row; None when no request has a seed."""
        seeds = [it.seed for it in items]
        return None if self.model.cuda_graph or all(s is None for s in seeds) else seeds

    def _serve(self, items: Sequence[Any]) -> List[Dict[str, Any]]:
        first = items[0]
        if isinstance(first, GenerateItem):
            return self._generate(items)
        if isinstance(first, ThinkItem):
            return self._think(items)
        return self.minimizer._serve(items)

    def _generate(self, items: Sequence[GenerateItem]) -> List[Dict[str, Any]]:
        first = items[0]
        tokens = torch.stack([it.prompt for it in items])
        S, n, options = tokens.shape[1], first.max_new_tokens, first.options
        out = self.model.generate(tokens, n, generator=self._generators(items), **options.generate_kwargs())
        new = out[:, S:].tolist()
        eos = options.eos_token_id
        answers = []
        for it, row in zip(items, new):
            stop = "length"
            if eos is not None and eos in row:  # the row's own stop: a call on it alone ends there
                row, stop = row[:row.index(eos) + 1], "eos"
            answers.append({"tokens": row, "stop": stop, "batch_size": len(items), "seed": it.seed})
        return answers

    def _think(self, items: Sequence[ThinkItem]) -> List[Dict[str, Any]]:
        tokens = torch.stack([it.context for it in items])
        res = self.model.think(tokens, generator=self._generators(items), **items[0].options.think_kwargs())
        logits = res.logits.detach().to("cpu", torch.float64)
        probs = torch.softmax(logits, dim=-1)
        k = max(it.top_k for it in items)
        top_p, top_i = torch.topk(probs, k, dim=-1)
        energy = res.energy.detach().to("cpu", torch.float64).tolist()
        energy0 = res.initial_energy.detach().to("cpu", torch.float64).tolist()
        sample = res.sample.tolist()
        answers = []
        for b, it in enumerate(items):
            ids = top_i[b, :it.top_k]
            a = {"top_tokens": ids.tolist(), "top_probs": [_json_number(x) for x in top_p[b, :it.top_k].tolist()],
                 "top_logits": [_json_number(x) for x in logits[b, ids].tolist()], "energy": _json_number(energy[b]),
                 "initial_energy": _json_number(energy0[b]), "sample": sample[b], "batch_size": len(items),
                 "seed": it.seed}
            if it.full_logits:
                a["logits"] = [_json_number(x) for x in logits[b].tolist()]
            answers.append(a)
        return answers
