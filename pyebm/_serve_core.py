"""Request handling of ``pyebm serve`` without Ray: parsing and checking requests, and running a batch of
them as one ``act()`` (``PolicyServer``, for a saved policy) or one ``pyebm.minimize`` (``EnergyServer``, for
a bare energy saved with its inference configuration). ``pyebm.serving`` builds the Ray Serve application
around them (``make_server`` picks the one a directory needs)."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

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
    """What both servers share: a batch of checked requests served one group (one key) at a time; a group
    whose call fails is served again one request at a time, so that only the failing request gets the error."""

    route = ""

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
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}

    def example_request(self, generator: torch.Generator) -> Dict[str, Any]:
        """A valid request with a random observation (``pyebm bench serve``)."""
        p = self.policy
        if p.flat:
            shape = (p.n_obs_steps, p.energy.context_dim // p.n_obs_steps)
        else:
            shape = (p.n_obs_steps, getattr(p.energy, "cond_dim", 1))
        return {"observation": torch.randn(shape, generator=generator, dtype=torch.float64).tolist()}

    # -- one request ---------------------------------------------------------------------------------
    def parse(self, payload: Any) -> Item:
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
    """"policy" or "energy": what ``model_dir`` holds; FileNotFoundError / ValueError unless it holds a saved
    EnergyPolicy or PolicyAdapter, or a bare energy saved with its inference configuration."""
    from pyebm.pretrained import _read_config, inference_config

    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"pyebm serve: model_dir must be a path; got {type(model_dir).__name__}")
    path = os.fspath(model_dir)
    name = _read_config(path).get("architecture")
    if name in _POLICIES:
        return "policy"
    if name in _ENERGIES:
        if inference_config(path) is None:
            raise ValueError(f"pyebm serve: {path!r} holds a {name} saved without an inference configuration; save "
                             "it with save_pretrained(dir, descent=pyebm.Descent(...), candidates=K) (the server "
                             "runs pyebm.minimize with them), or wrap it in pyebm.policies.EnergyPolicy and save that")
        return "energy"
    raise ValueError(f"pyebm serve: {path!r} holds {name!r}; the server runs an EnergyPolicy, a PolicyAdapter, or "
                     f"a bare energy ({', '.join(_ENERGIES)}) saved with descent= and candidates=")


def make_server(model_dir: "str | os.PathLike", device: Union[str, torch.device] = "cpu") -> "_Server":
    """The server for what ``model_dir`` holds: a ``PolicyServer`` for a saved policy or adapter, an
    ``EnergyServer`` for a bare energy saved with its inference configuration."""
    if _check_model_dir(model_dir) == "policy":
        return PolicyServer(model_dir, device=device)
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

        if _check_model_dir(model_dir) != "energy":
            raise ValueError(f"EnergyServer: {os.fspath(model_dir)!r} holds a policy; PolicyServer serves it "
                             "(pyebm.serving.make_server picks the server a directory needs)")
        self.device = torch.device(device)
        self.energy = from_pretrained(model_dir, device=self.device)
        self.descent, self.candidates = inference_config(model_dir)
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
                "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}

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

    def parse(self, payload: Any) -> EnergyItem:
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
