"""``pyebm serve`` end to end: a local Ray Serve on the loopback, 64 concurrent HTTP requests.

Checks: every answer equals a direct ``act`` (a policy, an adapter), ``minimize`` (a bare MLPEnergy saved
with its inference configuration) or ``EBT.generate`` / ``EBT.think`` (a tiny EBT with its saved defaults) on
the same observation, context or prompt and seed (a descent without further draws; for the EBT, seeded
sampling and noise too), batches larger than one are formed, and bad requests sent in the same window get
HTTP 400 with the reason while the requests around them succeed. Ray is started once for the module and shut
down at its end.
"""
from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import pyebm  # noqa: E402
from pyebm import Descent, MLPEnergy  # noqa: E402
from pyebm.adapter import PolicyAdapter  # noqa: E402
from pyebm.models import EBT, EBTInference  # noqa: E402
from pyebm.policies import EnergyPolicy  # noqa: E402
from pyebm.serving import build_app  # noqa: E402

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

N = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body) -> tuple:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple:
    with urllib.request.urlopen(url, timeout=60) as r:
        return r.status, json.loads(r.read())


def concurrently(url: str, bodies: list) -> list:
    """Every body posted from its own thread, all released at once."""
    out = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def one(i):
        barrier.wait()
        out[i] = post(url, bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    torch.manual_seed(0)
    energy = MLPEnergy(2 * 3, 2 * 2, hidden=(16, 16), residual=True)
    policy = EnergyPolicy(energy, Descent(steps=4, step_size=0.1), candidates=4, horizon=2,
                          action_dim=2, n_obs_steps=2, bounds=(-1.0, 1.0))
    adapter = PolicyAdapter(EnergyPolicy(energy, Descent(steps=4, step_size=0.1), candidates=4,
                                         horizon=2, action_dim=2, n_obs_steps=2, bounds=(-1.0, 1.0)),
                            observation_stats={"mean": torch.tensor([0.5, -0.5, 0.0]), "std": torch.tensor([2.0, 1.0, 0.5])},
                            action_stats={"min": torch.tensor([-2.0, 0.0]), "max": torch.tensor([2.0, 1.0])})
    dirs = {"policy": tmp_path_factory.mktemp("policy"), "adapter": tmp_path_factory.mktemp("adapter"),
            "energy": tmp_path_factory.mktemp("energy"), "ebt": tmp_path_factory.mktemp("ebt")}
    policy.save_pretrained(dirs["policy"])
    adapter.save_pretrained(dirs["adapter"])
    bare = MLPEnergy(5, 3, hidden=(16, 16))
    bare.save_pretrained(dirs["energy"], descent=ENERGY_DESCENT, candidates=6)
    # float64: a batch rounds differently from a one-prompt call, by about 1e-12 here: no token can flip
    ebt = EBT(vocab_size=29, embedding_dim=16, num_transformer_blocks=1, multiheaded_attention_heads=2,
              context_length=16, mcmc_step_size=2.0, langevin_dynamics_noise=0.1, dtype=torch.float64)
    ebt.save_pretrained(dirs["ebt"], inference=EBTInference(samples=2, temperature=1.5, top_p=0.9))
    return {"policy": (policy, dirs["policy"]), "adapter": (adapter, dirs["adapter"]),
            "energy": (bare, dirs["energy"]), "ebt": (EBT.from_pretrained(dirs["ebt"]), dirs["ebt"])}


ENERGY_DESCENT = Descent.gd(steps=4, step_size=0.1, lower=-1.0, upper=1.0, init="uniform")


@pytest.fixture(scope="module")
def server(policies):
    # logical CPUs for Ray's bookkeeping (four deployments of half a CPU and the bench test's of one)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # a long wait budget so that 64 requests released together are coalesced even on a loaded machine;
        # half a logical CPU each, so that the bench test's deployment (one CPU) fits next to them
        serve.run(build_app(policies["policy"][1], max_batch_size=16, batch_wait_timeout_s=0.25, name="policy",
                            ray_actor_options={"num_cpus": 0.5}),
                  name="policy", route_prefix="/policy")
        serve.run(build_app(policies["adapter"][1], max_batch_size=16, batch_wait_timeout_s=0.25, name="adapter",
                            ray_actor_options={"num_cpus": 0.5}),
                  name="adapter", route_prefix="/adapter")
        serve.run(build_app(policies["energy"][1], max_batch_size=16, batch_wait_timeout_s=0.25, name="energy",
                            ray_actor_options={"num_cpus": 0.5}),
                  name="energy", route_prefix="/energy")
        serve.run(build_app(policies["ebt"][1], max_batch_size=16, batch_wait_timeout_s=0.25, name="ebt",
                            ray_actor_options={"num_cpus": 0.5}),
                  name="ebt", route_prefix="/ebt")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_info(server):
    status, info = get(server + "/policy/info")
    assert status == 200
    assert info["architecture"] == "EnergyPolicy" and info["action_shape"] == [1, 2]
    assert info["observation_shapes"][0].startswith("[2, 3]")


@pytest.mark.parametrize("kind", ["policy", "adapter"])
def test_concurrent_requests_are_batched_and_equal_direct_act(server, policies, kind):
    obj, _ = policies[kind]
    obs = torch.randn(N, 2, 3, generator=torch.Generator().manual_seed(1))
    bodies = [{"observation": obs[i].tolist(), "seed": 1000 + i} for i in range(N)]
    answers = concurrently(f"{server}/{kind}/act", bodies)
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    for i, (_, body) in enumerate(answers):
        if kind == "policy":
            direct = obj.act(obs[i:i + 1], generator=1000 + i)[0]
        else:
            direct = obj.predict_action_chunk(obs[i:i + 1], generator=1000 + i)[0]
        got = torch.tensor(body["actions"], dtype=torch.float32)
        torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)
        assert body["seed"] == 1000 + i and isinstance(body["energy"], float)
    sizes = [body["batch_size"] for _, body in answers]
    assert max(sizes) > 1 and max(sizes) <= 16, sizes


def test_bad_requests_fail_alone(server, policies):
    policy, _ = policies["policy"]
    obs = torch.randn(N, 2, 3, generator=torch.Generator().manual_seed(2))
    bodies = [{"observation": obs[i].tolist(), "seed": i} for i in range(N)]
    bad = {5: {"observation": [[1.0, 2.0], [3.0, 4.0]]},                # wrong shape
           17: {"observation": [[1.0, "x", 3.0], [0.0, 0.0, 0.0]]},     # not a number
           30: {"seed": 3},                                             # no observation
           41: b"{not json",                                            # not JSON
           50: {"observation": obs[50].tolist(), "seed": -1}}           # bad seed
    for i, b in bad.items():
        bodies[i] = b
    answers = concurrently(f"{server}/policy/act", bodies)
    reasons = {5: "shape [2, 2]", 17: "observation[0][1] must be a number", 30: "no \"observation\"",
               41: "not JSON", 50: "seed must be"}
    for i, (status, body) in enumerate(answers):
        if i in bad:
            assert status == 400 and reasons[i] in body["error"], (i, status, body)
        else:
            assert status == 200, (i, body)
            torch.testing.assert_close(torch.tensor(body["actions"], dtype=torch.float32),
                                       policy.act(obs[i:i + 1], generator=i)[0], rtol=1e-5, atol=1e-6)
    assert max(body.get("batch_size", 0) for _, body in answers) > 1


def test_energy_requests_are_batched_into_minimize_and_bad_ones_fail_alone(server, policies):
    energy, _ = policies["energy"]
    status, info = get(server + "/energy/info")
    assert status == 200 and info["route"] == "/minimize" and info["candidates"] == 6
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, generator=g)
    inits = {i: (torch.rand(6, 3, generator=g) - 0.5) for i in range(0, N, 8)}
    bodies = [{"context": x[i].tolist(), "seed": 500 + i, **({"init": inits[i].tolist()} if i in inits else {})}
              for i in range(N)]
    bad = {3: {"context": [1.0, 2.0]},                                        # wrong shape
           20: {"context": [1.0, 2.0, float("nan"), 0.0, 0.0], "seed": 1},    # NaN (Python's JSON writes NaN)
           33: {"context": x[33].tolist(), "init": [[0.0, 0.0, 0.0]] * 2},    # init of the wrong shape
           47: {"observation": x[47].tolist()}}                               # the policy's field
    for i, b in bad.items():
        bodies[i] = b
    answers = concurrently(f"{server}/energy/minimize", bodies)
    reasons = {3: "context has shape [2]", 20: "NaN", 33: "init has shape [2, 3]", 47: "unknown fields"}
    for i, (status, body) in enumerate(answers):
        if i in bad:
            assert status == 400 and reasons[i] in body["error"], (i, status, body)
            continue
        assert status == 200, (i, body)
        direct = pyebm.minimize(energy, x[i:i + 1], 6, ENERGY_DESCENT,
                                init=inits[i][None] if i in inits else None, generator=500 + i)
        torch.testing.assert_close(torch.tensor(body["y"], dtype=torch.float32), direct.best[0], rtol=1e-5, atol=1e-6)
        assert body["index"] == int(direct.best_index[0]) and body["seed"] == 500 + i
        assert body["energy"] == pytest.approx(float(direct.best_energy[0]), rel=1e-5, abs=1e-6)
    sizes = [body["batch_size"] for status, body in answers if status == 200]
    assert max(sizes) > 1 and max(sizes) <= 16, sizes
    status, body = post(f"{server}/energy/act", {"context": x[0].tolist()})
    assert status == 404 and "POST /minimize" in body["error"]


def test_ebt_generate_and_think_requests_are_batched_and_bad_ones_fail_alone(server, policies):
    model, _ = policies["ebt"]
    status, info = get(server + "/ebt/info")
    assert status == 200 and info["routes"] == ["/generate", "/think"] and info["vocab_size"] == 29
    assert EBTInference.from_dict(info["inference"]) == EBTInference(samples=2, temperature=1.5, top_p=0.9)
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, 29, (N, 5), generator=g).tolist()
    urls, bodies = [], []
    for i in range(N):  # seeded sampling (the saved default), a few greedy ones, a few /think
        if i % 8 == 7:
            urls.append(f"{server}/ebt/think")
            bodies.append({"context": prompts[i], "seed": 300 + i, "top_k": 3})
        else:
            urls.append(f"{server}/ebt/generate")
            bodies.append({"prompt": prompts[i], "max_new_tokens": 4, "seed": 300 + i,
                           **({"temperature": 0} if i % 8 == 3 else {})})
    bad = {2: {"prompt": prompts[2] + [29], "max_new_tokens": 4},              # out of the vocabulary
           12: {"prompt": [1, 2.5], "max_new_tokens": 4},                      # not a token id
           21: {"prompt": [1] * 14, "max_new_tokens": 4},                      # past context_length
           34: {"prompt": prompts[34], "max_new_tokens": 4, "beam": 2},        # unknown field
           45: {"prompt": prompts[45], "max_new_tokens": 0}}                   # no token to generate
    for i, b in bad.items():
        bodies[i] = b
    out = [None] * N
    barrier = threading.Barrier(N)

    def one(i):
        barrier.wait()
        out[i] = post(urls[i], bodies[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reasons = {2: "prompt[5] = 29 is not a token id", 12: "prompt[1] must be a token id", 21: "context_length=16",
               34: "unknown fields ['beam']", 45: "max_new_tokens must be an int >= 1"}
    for i, (status, body) in enumerate(out):
        if i in bad:
            assert status == 400 and reasons[i] in body["error"], (i, status, body)
            continue
        assert status == 200, (i, body)
        x = torch.tensor([prompts[i]])
        if i % 8 == 7:
            direct = model.think(x, generator=300 + i)
            assert body["top_tokens"] == torch.topk(direct.logits[0], 3).indices.tolist()
            assert body["energy"] == pytest.approx(float(direct.energy[0]), rel=1e-9, abs=1e-12)
        else:
            opts = {"temperature": 0.0} if i % 8 == 3 else {}
            assert body["tokens"] == model.generate(x, 4, generator=300 + i, **opts)[0, 5:].tolist(), i
    sizes = [body["batch_size"] for status, body in out if status == 200 and "tokens" in body]
    assert max(sizes) > 1 and max(sizes) <= 16, sizes
    status, body = post(f"{server}/ebt/minimize", {"context": prompts[0]})
    assert status == 404 and "POST /generate or POST /think or GET /info" in body["error"]


def test_bench_serve_reports_latency_throughput_and_batch_sizes(server, policies, tmp_path):
    """`pyebm bench serve MODEL_DIR` in this process: it reuses the running Ray and Serve (their port), deploys
    its own application, loads it and takes it down again."""
    from pyebm.cli import main

    out = tmp_path / "serve.json"
    port = server.rsplit(":", 1)[1]
    assert main(["bench", "serve", str(policies["policy"][1]), "--requests", "64", "--clients", "16",
                 "--max-batch-size", "8", "--port", port, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["requests"], r["ok"], r["errors"], r["clients"]) == (64, 64, 0, 16)
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["throughput_rps"] > 0
    sizes = {int(k): v for k, v in r["batch_sizes"].items()}
    assert sum(sizes.values()) == 64 and max(sizes) <= 8
    assert all(v % k == 0 for k, v in sizes.items())  # a batch of k answers k requests
    assert "pyebm-bench" not in serve.status().applications  # taken down again


@pytest.mark.parametrize("kind", ["energy", "ebt"])
def test_bench_serve_takes_an_energy_or_ebt_directory(server, policies, tmp_path, kind):
    from pyebm.cli import main

    out = tmp_path / "serve.json"
    port = server.rsplit(":", 1)[1]
    assert main(["bench", "serve", str(policies[kind][1]), "--requests", "16", "--clients", "8",
                 "--max-batch-size", "8", "--port", port, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["requests"], r["ok"], r["errors"]) == (16, 16, 0), r["first_error"]
    assert r["route"] == ("/minimize" if kind == "energy" else "/generate")
    assert "pyebm-bench" not in serve.status().applications
