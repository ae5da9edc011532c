"""`pyebm bench serve [MODEL_DIR]`: latency and throughput of ``pyebm serve`` under concurrent load.

Starts the server locally (Ray Serve on 127.0.0.1; a Ray instance already running in the process is reused,
its Serve too, then ``--port`` must be its port), fires ``--requests`` requests from ``--clients`` client
threads (each sends its next request as soon as its previous one is answered), and reports the latency
percentiles p50 / p99 (milliseconds, per request, from sending to the whole answer read), the throughput
(requests answered per second of wall time) and the batch sizes the server formed (from each answer's
``batch_size``). MODEL_DIR is anything ``pyebm serve`` serves (a saved policy or adapter: ``POST /act``; a
bare energy saved with its inference configuration: ``POST /minimize``; an EBT: ``POST /generate``, random
prompts of 8 tokens (fewer if the context is shorter), 8 new tokens each, with the directory's think /
generate defaults); the requests are random observations, contexts or prompts of an accepted shape, each with
its own seed. Without MODEL_DIR a small IBC policy (MLPEnergy, 2 x 64
hidden, 16 candidates, 10 Langevin steps) is built and saved in a temporary folder. ``--clients`` warm-up
requests run first and are not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pyebm bench serve [MODEL_DIR]", "load test of pyebm serve (see pyebm.bench.serve_bench)")
    g.add_argument("--requests", type=int, default=512, metavar="N", help="requests counted (512)")
    g.add_argument("--clients", type=int, default=64, metavar="M", help="concurrent client threads (64)")
    g.add_argument("--max-batch-size", type=int, default=32, metavar="N",
                   help="server: requests per act() / minimize() / generate() (32)")
    g.add_argument("--batch-wait-timeout-s", type=float, default=0.01, metavar="S",
                   help="server: seconds to wait to fill a batch (0.01)")
    g.add_argument("--replicas", type=int, default=1, metavar="N", help="server: replicas (1)")
    g.add_argument("--port", type=int, default=0, metavar="PORT", help="server port (default: a free one)")


def _post(url: str, body: bytes, timeout: float = 120.0):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def load_test(url: str, bodies: Sequence[Dict[str, Any]], clients: int) -> Dict[str, Any]:
    """Post every body to ``url`` from ``clients`` threads; the statistics of ``summarize``."""
    if clients < 1 or not bodies:
        raise ValueError(f"load_test: need clients >= 1 and at least one request; got {clients}, {len(bodies)}")
    encoded = [json.dumps(b).encode() for b in bodies]
    records: List[Optional[tuple]] = [None] * len(encoded)
    lock = threading.Lock()
    next_index = [0]
    start = threading.Barrier(min(clients, len(encoded)) + 1)

    def client():
        start.wait()
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(encoded):
                return
            t0 = time.perf_counter()
            try:
                status, body = _post(url, encoded[i])
            except (OSError, ValueError) as e:
                status, body = 0, {"error": str(e)}
            records[i] = (time.perf_counter() - t0, status, body)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(clients, len(encoded)))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return summarize(records, time.perf_counter() - t0, clients)


def summarize(records: Sequence[tuple], wall_s: float, clients: int) -> Dict[str, Any]:
    """p50 / p99 / mean latency (ms) of the answered requests, throughput, errors and batch sizes."""
    ok = [r for r in records if r is not None and r[1] == 200]
    lat = np.array([r[0] for r in ok]) * 1e3
    sizes: Dict[int, int] = {}
    for r in ok:
        sizes[int(r[2]["batch_size"])] = sizes.get(int(r[2]["batch_size"]), 0) + 1
    errors = [r[2].get("error", "") for r in records if r is not None and r[1] != 200]
    return {"requests": len(records), "ok": len(ok), "errors": len(errors), "first_error": errors[0] if errors else None,
            "clients": clients, "wall_s": wall_s, "throughput_rps": len(ok) / wall_s if wall_s > 0 else float("nan"),
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "mean_ms": float(lat.mean()) if len(lat) else float("nan"),
            # requests served per batch size (a batch of n holds n requests)
            "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "mean_batch_size": (sum(k * v for k, v in sizes.items()) / len(ok)) if ok else float("nan")}


def demo_policy_dir(path: str) -> str:
    """A small IBC policy saved in ``path`` (for a run without MODEL_DIR)."""
    import torch

    from pyebm.policies import EnergyPolicy

    torch.manual_seed(0)
    policy = EnergyPolicy.ibc(action_dim=2, obs_dim=8, horizon=4, n_obs_steps=2, hidden=(64, 64), candidates=16,
                              steps=10)
    policy.save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench(model_dir: str, *, requests: int = 512, clients: int = 64, max_batch_size: int = 32,
          batch_wait_timeout_s: float = 0.01, replicas: int = 1, device: str = "cpu", port: int = 0) -> Dict[str, Any]:
    """Deploy ``model_dir`` on a local Ray Serve, run ``load_test``, take the deployment down again."""
    import ray
    import torch

    from pyebm.serving import _ray_serve, build_app, make_server

    serve = _ray_serve()
    for name, v in (("requests", requests), ("clients", clients)):
        if v < 1:
            raise ValueError(f"pyebm bench serve: --{name} must be >= 1; got {v}")
    app = build_app(model_dir, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                    replicas=replicas, device=device, name="pyebm-bench")
    server = make_server(model_dir)  # the requests it takes: random ones of the accepted shape
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=max(2, replicas), include_dashboard=False, log_to_driver=False)
    port = port or _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="pyebm-bench", route_prefix="/pyebm-bench")
        url = f"http://127.0.0.1:{port}/pyebm-bench/{server.route}"
        g = torch.Generator().manual_seed(0)
        bodies = [dict(server.example_request(g), seed=i) for i in range(requests + clients)]
        load_test(url, bodies[:clients], clients)  # warm-up
        result = load_test(url, bodies[clients:], clients)
    finally:
        if started_ray:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete("pyebm-bench")
    result.update(model_dir=model_dir, route=f"/{server.route}", max_batch_size=max_batch_size,
                  batch_wait_timeout_s=batch_wait_timeout_s, replicas=replicas, device=device)
    return result


def print_result(r: Dict[str, Any]) -> None:
    head = (f"pyebm serve: {r['model_dir']} {r.get('route', '')} (max batch {r['max_batch_size']}, wait {r['batch_wait_timeout_s']} s, "
            f"{r['replicas']} replica(s), {r['device']}); {r['requests']} requests from {r['clients']} clients")
    rows = [("answered", f"{r['ok']} ({r['errors']} errors)"), ("p50 latency", f"{r['p50_ms']:.2f} ms"),
            ("p99 latency", f"{r['p99_ms']:.2f} ms"), ("mean latency", f"{r['mean_ms']:.2f} ms"),
            ("throughput", f"{r['throughput_rps']:.1f} requests/s"),
            ("mean batch size", f"{r['mean_batch_size']:.2f}"),
            ("requests per batch size", ", ".join(f"{k}: {v}" for k, v in r["batch_sizes"].items()))]
    if r["first_error"]:
        rows.append(("first error", r["first_error"]))
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(head)
        for k, v in rows:
            print(f"  {k:24s} {v}")
        return
    table = Table(title=head, show_header=False)
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def run(args: argparse.Namespace) -> int:
    """``pyebm bench serve [MODEL_DIR]`` (``args.suites`` is ["serve"] or ["serve", MODEL_DIR])."""
    rest = args.suites[1:]
    if len(rest) > 1:
        raise SystemExit(f"pyebm bench serve: give at most one MODEL_DIR; got {rest}")
    with tempfile.TemporaryDirectory(prefix="pyebm-bench-serve-") as tmp:
        model_dir = rest[0] if rest else demo_policy_dir(os.path.join(tmp, "policy"))
        try:
            result = bench(model_dir, requests=args.requests, clients=args.clients,
                           max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
                           replicas=args.replicas, device=args.device, port=args.port)
        except (ImportError, ValueError, TypeError, FileNotFoundError) as e:
            raise SystemExit(f"pyebm bench serve: {e}")
    if not rest:
        result["model_dir"] = "(built-in IBC policy)"
    from pyebm.bench.host import machine_info

    result["machine"] = machine_info(args.device)
    print_result(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0
