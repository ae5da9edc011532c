"""Request handling of ``pyebm serve`` without Ray: parsing and checking requests, and running a batch of
them as one ``act()`` (``PolicyServer``). ``pyebm.serving`` builds the Ray Serve application around it."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

_SERVED = ("EnergyPolicy", "PolicyAdapter")
_FIELDS = ("observation", "seed")
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


class PolicyServer:
    """The request handling of ``pyebm serve`` without Ray: check one request (``parse``), serve a batch of
    checked requests (``run``). The Ray Serve deployment of ``build_app`` holds one per replica.

    Args:
        model_dir: a directory written by ``save_pretrained`` of an EnergyPolicy or a PolicyAdapter.
        device: where the weights live and ``act`` runs ("cpu", "cuda", "cuda:1", ...).
    """

    def __init__(self, model_dir: "str | os.PathLike", device: Union[str, torch.device] = "cpu"):
        from pyebm.adapter import PolicyAdapter
        from pyebm.policies import EnergyPolicy
        from pyebm.pretrained import from_pretrained

        _check_model_dir(model_dir)
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
                "observation_shapes": self.observation_shapes(), "action_shape": [steps, p.action_dim],
                "candidates": p.candidates, "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device)}

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
        seed = payload.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not 0 <= seed < _MAX_SEED):
            raise RequestError(f"seed must be an int in [0, 2**63) or absent; got {seed!r:.40}")
        value = payload["observation"]
        shape = _shape_of(value, "observation")
        if not self._shape_ok(shape):
            raise RequestError(f"observation has shape {list(shape)}; this policy takes one observation of shape "
                               + " or ".join(self.observation_shapes()))
        obs = torch.tensor(value, dtype=torch.float64).to(self.dtype)
        if not bool(torch.isfinite(obs).all()):
            raise RequestError(f"observation contains NaN, Inf or a number too large for {self.dtype}")
        obs = obs.to(self.device)
        try:  # the policy's own checks, on a batch of one (cheap: shapes and finiteness)
            batch = self.policy._context(obs.unsqueeze(0), check_finite=False)
            if self.adapter is not None:
                self.adapter.normalize_observation(obs.unsqueeze(0))
        except (TypeError, ValueError) as e:
            raise RequestError(f"observation: {e}") from None
        del batch
        return Item(observation=obs, seed=None if seed is None else int(seed))

    # -- a batch of checked requests -----------------------------------------------------------------
    def run(self, items: Sequence[Item]) -> List[Union[Dict[str, Any], RequestError]]:
        """One answer per item, in order: a response dict or a ``RequestError``. Items with observations of
        one shape are served by one ``act``; when it fails, each of its items is run alone."""
        out: List[Any] = [None] * len(items)
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(tuple(it.observation.shape), []).append(i)
        for idx in groups.values():
            try:
                answers = self._act([items[i] for i in idx])
            except Exception as e:  # noqa: BLE001 -- find the failing item(s): each one again alone
                if len(idx) == 1:
                    answers = [_as_error(e)]
                else:
                    answers = []
                    for i in idx:
                        try:
                            answers.extend(self._act([items[i]]))
                        except Exception as e1:  # noqa: BLE001
                            answers.append(_as_error(e1))
            for i, a in zip(idx, answers):
                out[i] = a
        return out

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


def _check_model_dir(model_dir) -> None:
    """FileNotFoundError / ValueError unless ``model_dir`` holds a saved EnergyPolicy or PolicyAdapter."""
    from pyebm.pretrained import _read_config

    if not isinstance(model_dir, (str, os.PathLike)):
        raise TypeError(f"pyebm serve: model_dir must be a path; got {type(model_dir).__name__}")
    name = _read_config(os.fspath(model_dir)).get("architecture")
    if name not in _SERVED:
        raise ValueError(f"pyebm serve: {os.fspath(model_dir)!r} holds {name!r}; the server runs an EnergyPolicy "
                         "or a PolicyAdapter (their directories hold the Descent and the chunk shape). Wrap an "
                         "energy in pyebm.policies.EnergyPolicy and save that")
