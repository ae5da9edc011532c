"""An HTTP inference server for saved policies, on Ray Serve: ``pyebm serve MODEL_DIR``.

    pyebm serve my_policy --port 8000 --max-batch-size 32 --batch-wait-timeout-s 0.01
    curl -s localhost:8000/act -d '{"observation": [[0.1, 0.2, 0.3], [0.0, 0.1, 0.2]], "seed": 7}'

    app = pyebm.serving.build_app("my_policy", max_batch_size=32)   # the same, from Python
    ray.serve.run(app)

``MODEL_DIR`` is a directory written by ``save_pretrained`` of an ``EnergyPolicy`` or a
``pyebm.adapter.PolicyAdapter`` (the directory holds the energy's weights and the inference configuration:
the ``Descent``, candidates, chunk shape, bounds, normalisation). A bare energy (``MLPEnergy``, ``EBT``,
``EBTPolicy``) is refused: its directory has no ``Descent``; wrap it in an ``EnergyPolicy`` and save that.

Requests (JSON, ``POST /act``)::

    {"observation": [[...], ...], "seed": 7}

``observation``: one observation as nested lists of numbers, without a batch dimension: [n_obs_steps,
obs_dim] or [context_dim] for a policy over an ``MLPEnergy``, observation tokens [L, cond_dim] (L a
multiple of n_obs_steps) for an ``EBTPolicy``; in the data's units for a ``PolicyAdapter`` (normalised by
its statistics). ``seed`` (optional): an int in [0, 2**63). ``GET /info`` answers the accepted shapes.

Response (200)::

    {"actions": [[...], ...], "energy": -1.25, "batch_size": 12, "seed": 7}

``actions`` [n_action_steps, action_dim]: the executed window of the chosen chunk (for a ``PolicyAdapter``
the first ``n_action_steps`` of the adapter, un-normalised: what ``predict_action_chunk`` returns; the
server keeps no action queue and no warm start between requests). ``energy``: the chosen chunk's final
energy, ``null`` when the policy skips that pass (one candidate and no ``final_energy=True``), the string
"nan", "inf" or "-inf" when it is not finite (JSON has no such numbers).
``batch_size``: how many requests the ``act`` call that served this one held.

A bad request (no JSON object, a missing or unknown field, a non-number, a ragged or wrongly shaped
observation, NaN or Inf, a bad seed) is answered 400 ``{"error": "..."}`` with the reason before it joins a
batch, so it never affects the requests batched with it; if a batched ``act`` fails nevertheless, each of
its requests is run again alone, so that only the failing one gets its error.

Batching: Ray Serve's ``@serve.batch`` collects the requests that reach a replica within
``batch_wait_timeout_s`` (up to ``max_batch_size``); requests with observations of one shape are served by
one ``act`` on the stacked observations ([B, ...]), requests of another shape by another. ``replicas``
copies of the deployment share the traffic (``num_replicas`` of the Ray Serve deployment).

Seeds under batching (what holds exactly):

* The initial candidates of a request with a seed are drawn from ``torch.Generator(device).manual_seed(seed)``
  alone, the numbers ``policy.act(obs[None], generator=seed)`` draws for them, whatever else is in the batch.
  Requests without a seed draw theirs from torch's global generator.
* Every further draw of the ``act`` (per-step noise, "sample" selection, DFO resampling, recovery's new
  candidates) comes from the generator of the batch's first seeded request, continued after its initial
  draw. A request served alone (``batch_size`` 1) therefore reproduces ``act(obs[None], generator=seed)``
  draw for draw; in a larger batch those draws depend on the other requests.
* A descent without further draws (no noise, selection "min", "max" or "max_gap", no recovery) computes
  each row from its own initial candidates: the answer equals ``act(obs[None], generator=seed)`` within float
  rounding (a batched matrix product may round differently from a one-row one), except with a descent
  that couples the batch (``Descent.ebt_policy(coupled=True)`` normalises over the whole batch).

Tested in ``tests/test_serving.py`` (the request checks, batching by shape, seeds and the split of a failing
batch, without Ray) and ``tests/test_serving_ray.py`` (a local Ray Serve on the loopback: 64 concurrent
requests, answers equal to direct ``act`` calls, batches larger than one, bad requests answered 400 while
the requests around them succeed). Not tested here: GPUs (``--device cuda``), several machines.
"""
from __future__ import annotations

import argparse
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


def _ray_serve():
    """The ``ray.serve`` module (the optional dependency ``pip install 'pyebm[serve]'``)."""
    try:
        from ray import serve
    except ImportError:
        raise ImportError("pyebm serving runs on Ray Serve: pip install 'ray[serve]' (or pip install "
                          "'pyebm[serve]')") from None
    return serve


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


def _check_options(max_batch_size, batch_wait_timeout_s, replicas, device) -> None:
    for name, v in (("max_batch_size", max_batch_size), ("replicas", replicas)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"build_app: {name} must be an int >= 1; got {v!r}")
    if isinstance(batch_wait_timeout_s, bool) or not isinstance(batch_wait_timeout_s, numbers.Real) \
            or not 0 <= batch_wait_timeout_s < math.inf:
        raise ValueError(f"build_app: batch_wait_timeout_s must be a number of seconds >= 0; got "
                         f"{batch_wait_timeout_s!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"build_app: device must be a torch device such as 'cpu' or 'cuda'; got {device!r}") from None


def build_app(model_dir: "str | os.PathLike", *, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.01,
              replicas: int = 1, device: str = "cpu", ray_actor_options: Optional[Dict[str, Any]] = None,
              name: str = "pyebm"):
    """The Ray Serve application that serves ``model_dir`` (run it with ``ray.serve.run(app)``).

    Args:
        model_dir: a directory of a saved EnergyPolicy or PolicyAdapter (checked here; each replica loads it).
        max_batch_size: requests per batched ``act`` at most.
        batch_wait_timeout_s: how long a replica waits for more requests after the first of a batch.
        replicas: copies of the deployment (``num_replicas``).
        device: where each replica runs ``act``; "cuda" asks Ray for one GPU per replica.
        ray_actor_options: each replica's Ray actor options (default ``{"num_cpus": 1}``, plus ``num_gpus: 1``
            for a CUDA device).
        name: the deployment's name.
    """
    _ray_serve()
    _check_options(max_batch_size, batch_wait_timeout_s, replicas, device)
    _check_model_dir(model_dir)
    from pyebm._serve_app import PolicyDeployment

    options = {"num_cpus": 1}
    if torch.device(device).type == "cuda":
        options["num_gpus"] = 1
    options.update(ray_actor_options or {})
    deployment = PolicyDeployment.options(name=name, num_replicas=int(replicas), ray_actor_options=options,
                                          max_ongoing_requests=max(2 * int(max_batch_size), 8))
    return deployment.bind(os.path.abspath(os.fspath(model_dir)), str(device), int(max_batch_size),
                           float(batch_wait_timeout_s))


# -- pyebm serve ------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve a saved EnergyPolicy or PolicyAdapter over HTTP on Ray Serve: POST /act with "
                     "{\"observation\": [...], \"seed\": int}; concurrent requests are batched into one act(). "
                     "GET /info tells the accepted shapes. Needs pip install 'pyebm[serve]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a directory written by save_pretrained")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="requests per act() at most (32)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01, metavar="S",
                   help="seconds a replica waits to fill a batch (0.01)")
    p.add_argument("--replicas", type=int, default=1, metavar="N", help="copies of the deployment (1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def _stop(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    import signal
    import time

    try:
        serve = _ray_serve()
        app = build_app(args.model_dir, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_timeout_s, replicas=args.replicas, device=args.device)
    except (ImportError, ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"pyebm serve: {e}")
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)  # RAY_ADDRESS set: joins that cluster; else starts a local one
    # Ctrl-C or SIGTERM: take the application down and stop Ray (SIGINT is set explicitly: a process started
    # in the background by a non-interactive shell inherits it ignored)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="pyebm", route_prefix="/")
        print(f"pyebm serve: {args.model_dir} at http://{args.host}:{args.port}/act (POST), /info (GET); "
              "Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("pyebm serve: stopping", flush=True)
        serve.shutdown()
        ray.shutdown()
    return 0
