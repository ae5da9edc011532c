"""An HTTP inference server for saved policies and energies, on Ray Serve: ``pyebm serve MODEL_DIR``.

    pyebm serve my_policy --port 8000 --max-batch-size 32 --batch-wait-timeout-s 0.01
    curl -s localhost:8000/act -d '{"observation": [[0.1, 0.2, 0.3], [0.0, 0.1, 0.2]], "seed": 7}'

    app = pyebm.serving.build_app("my_policy", max_batch_size=32)   # the same, from Python
    ray.serve.run(app)

``MODEL_DIR`` is a directory written by ``save_pretrained`` of

* an ``EnergyPolicy`` or a ``pyebm.adapter.PolicyAdapter`` (the directory holds the energy's weights and the
  inference configuration: the ``Descent``, candidates, chunk shape, bounds, normalisation): the server
  answers ``POST /act`` with ``act()`` (below);
* an ``EBT`` (any directory of one): the server answers ``POST /generate`` with ``EBT.generate`` and ``POST
  /think`` with ``EBT.think`` (see "EBT" below), with the think / generate defaults saved in the directory
  (``save_pretrained(dir, inference=EBTInference(...))``); saved also with ``descent=`` and ``candidates=``, it
  answers ``POST /minimize`` as well;
* a bare energy (``MLPEnergy``, ``EBT``, ``EBTPolicy``) saved with its inference configuration,
  ``energy.save_pretrained(dir, descent=cfg, candidates=K)``: the server answers ``POST /minimize`` with
  ``pyebm.minimize(energy, contexts, K, cfg)`` (see "Energies" below). An ``MLPEnergy`` or ``EBTPolicy`` saved
  without them is refused (the server would not know how to minimise it).

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

Energies (JSON, ``POST /minimize``)::

    {"context": [...], "init": [...], "seed": 7}
    -> {"y": [...], "energy": -1.25, "index": 3, "batch_size": 12, "seed": 7}

``context``: one context without a batch dimension: [context_dim] for an ``MLPEnergy``, observation tokens
[L, cond_dim] (L a multiple of n_obs_steps) for an ``EBTPolicy``, token ids [S] (ints in [0, vocab_size),
1 <= S <= context_length) for an ``EBT``. ``init`` (optional): the initial candidates, [*event] (shared by
the K candidates) or [K, *event]; without it they are drawn by the descent's ``init`` from the seed.
``seed`` (optional) as for policies. The answer: ``y`` [*event], the selected candidate (``DescentResult.best``
of its row), its final ``energy`` and ``index`` among the K candidates. Requests with contexts of one shape
are served by one ``minimize`` on the stacked contexts, with every request's initial candidates passed as
``init``: a request's candidates are the ones ``minimize(energy, context[None], K, cfg, generator=seed)``
draws (or its ``init``), whatever shares its batch, and the further draws (noise, "sample" selection, DFO
resampling) come from the generator of the batch's first seeded request, after its initial draw. The same
exactness as for policies follows: served alone, a request reproduces
``minimize(energy, context[None], K, cfg, init=init, generator=seed)`` draw for draw; in a batch, a descent
without further draws (and without options that couple the batch: ``normalize="rms_all"``, ``tol_scope=
"all"``) gives each row the answer of its own call within float rounding. Bad requests (a missing or
unknown field, a non-number, a wrong shape, NaN or Inf in the context or init, a token id out of range, a
bad seed) are answered 400 with the reason before they join a batch.

EBT (JSON, ``POST /generate`` and ``POST /think``)::

    {"prompt": [5, 17, 3], "max_new_tokens": 8, "seed": 7, "temperature": 0.8, "top_p": 0.95}
    -> {"tokens": [41, 9, 2], "stop": "eos", "batch_size": 4, "seed": 7}
    {"context": [5, 17, 3], "top_k": 3, "seed": 7}
    -> {"top_tokens": [41, 8, 2], "top_probs": [0.61, 0.2, 0.05], "top_logits": [...], "energy": -3.1,
        "initial_energy": -1.2, "sample": 0, "batch_size": 2, "seed": 7}

``prompt`` / ``context``: token ids (ints in [0, vocab_size)), 1 <= S <= context_length. ``max_new_tokens``
(required): an int >= 1 with S + max_new_tokens - 1 <= context_length (and at most the server's limit).
Optional, per request (absent or null: the directory's default, ``model.inference``): ``steps``, ``alpha``,
``noise``, ``samples``, ``select``, ``accept_lower`` (both routes); ``temperature``, ``top_p``, ``eos_token_id``
(generate); ``top_k`` (think: how many of the most probable next tokens to report, default 5) and
``full_logits`` (think: true adds ``"logits"``, all V of them). ``steps`` and ``samples`` are bounded (64 each,
or the saved default when larger; ``GET /info`` says). ``tokens`` are the new tokens only, cut after the first
``eos_token_id`` (``stop`` "eos"; else "length"). ``/think`` optimises the next token after the context:
``top_probs`` = softmax of the optimised logits, ``energy`` / ``initial_energy`` of the chosen sample
(``ThinkResult``). Requests with the same route, length S, ``max_new_tokens`` and options are served by one
``EBT.generate`` / ``EBT.think`` call on the stacked prompts [B, S]; different options are never mixed in one
call. Seeds: the call gets one generator per prompt (``generator=[seed_1, ..., seed_B]``, None for a request
without a seed: torch's global generator), and each prompt then draws exactly what a call on it alone with its
seed draws (initial vectors, noise, top-p draws), whatever shares its batch. The numbers of the forward
passes agree with a one-prompt call within float rounding (a batched matrix product may round differently
from a one-row one), so greedy and seeded sampled tokens equal those of
``model.generate(prompt[None], n, generator=seed, **options)`` unless two candidates tie within rounding.
A model with ``cuda_graph=True`` refuses seeds (its graphs draw from the default CUDA generator).

Tested in ``tests/test_serving.py`` (the request checks, batching by shape, seeds and the split of a failing
batch, for policies, energies and EBTs, without Ray) and ``tests/test_serving_ray.py`` (a local Ray Serve on the
loopback: 64 concurrent requests to a policy, an adapter, an MLPEnergy and an EBT, answers equal to direct
``act`` / ``minimize`` / ``generate`` / ``think`` calls, batches larger than one, bad requests answered 400
while the requests around them succeed). Not tested here: GPUs (``--device cuda``), several machines.
"""
from __future__ import annotations

import argparse
import math
import numbers
import os
from typing import Any, Dict, Optional

import torch

from pyebm._serve_core import (EBTServer, EnergyItem, EnergyServer, GenerateItem, Item, PolicyServer, RequestError,
                               ThinkItem, _check_model_dir, make_server, model_routes)

__all__ = ["build_app", "make_server", "model_routes", "PolicyServer", "EnergyServer", "EBTServer", "RequestError",
           "Item", "EnergyItem", "GenerateItem", "ThinkItem", "add_arguments", "run"]


def _ray_serve():
    """The ``ray.serve`` module (the optional dependency ``pip install 'pyebm[serve]'``)."""
    try:
        from ray import serve
    except ImportError:
        raise ImportError("pyebm serving runs on Ray Serve: pip install 'ray[serve]' (or pip install "
                          "'pyebm[serve]')") from None
    return serve


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
        model_dir: a directory of a saved EnergyPolicy, PolicyAdapter or EBT, or of a bare energy saved with its
            inference configuration (checked here; each replica loads it).
        max_batch_size: requests per batched ``act`` / ``minimize`` / ``generate`` / ``think`` at most.
        batch_wait_timeout_s: how long a replica waits for more requests after the first of a batch.
        replicas: copies of the deployment (``num_replicas``).
        device: where each replica runs ``act`` / ``minimize``; "cuda" asks Ray for one GPU per replica.
        ray_actor_options: each replica's Ray actor options (default ``{"num_cpus": 1}``, plus ``num_gpus: 1``
            for a CUDA device).
        name: the deployment's name.
    """
    _ray_serve()
    _check_options(max_batch_size, batch_wait_timeout_s, replicas, device)
    _check_model_dir(model_dir)
    from pyebm._serve_app import ModelDeployment

    options = {"num_cpus": 1}
    if torch.device(device).type == "cuda":
        options["num_gpus"] = 1
    options.update(ray_actor_options or {})
    deployment = ModelDeployment.options(name=name, num_replicas=int(replicas), ray_actor_options=options,
                                          max_ongoing_requests=max(2 * int(max_batch_size), 8))
    return deployment.bind(os.path.abspath(os.fspath(model_dir)), str(device), int(max_batch_size),
                           float(batch_wait_timeout_s))


# -- pyebm serve ------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve a saved EnergyPolicy or PolicyAdapter over HTTP on Ray Serve: POST /act with "
                     "{\"observation\": [...], \"seed\": int}; concurrent requests are batched into one act(). "
                     "A bare energy saved with descent= and candidates=: POST /minimize with {\"context\": [...], "
                     "\"init\": [...], \"seed\": int}, batched into one pyebm.minimize(). "
                     "An EBT: POST /generate with {\"prompt\": [token ids], \"max_new_tokens\": n, \"seed\": int, ...} "
                     "and POST /think with {\"context\": [token ids], \"top_k\": k, ...}, batched into one "
                     "EBT.generate() / EBT.think() per prompt length and options. "
                     "GET /info tells the accepted shapes. Needs pip install 'pyebm[serve]'.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a directory written by save_pretrained")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N",
                   help="requests per batched act() / minimize() / generate() / think() at most (32)")
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
        routes = ", ".join(f"/{r}" for r in model_routes(args.model_dir))
        print(f"pyebm serve: {args.model_dir} at http://{args.host}:{args.port}: {routes} (POST), /info (GET); "
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
