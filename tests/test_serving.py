"""pyebm.serving without Ray: the request checks, batching by shape, seeds and the split of a failing batch.

``PolicyServer`` / ``EnergyServer`` is what each Ray Serve replica runs (``tests/test_serving_ray.py`` runs
them behind HTTP). Every answer is compared with a direct ``act`` / ``predict_action_chunk`` / ``minimize``
call on the same observation or context.
"""
from __future__ import annotations

import re

import pytest
import torch

import pyebm
from pyebm import Descent, MLPEnergy
from pyebm.adapter import PolicyAdapter
from pyebm.cli import build_parser
from pyebm.models import EBT, EBTPolicy
from pyebm.policies import EnergyPolicy
from pyebm.serving import EnergyItem, EnergyServer, Item, PolicyServer, RequestError, make_server

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")


def mlp_policy(**kwargs):
    torch.manual_seed(0)
    energy = MLPEnergy(2 * 3, 3 * 2, hidden=(16, 16), residual=True)
    return EnergyPolicy(energy, Descent(steps=4, step_size=0.1), candidates=5, horizon=3, action_dim=2,
                        n_obs_steps=2, bounds=(-1.0, 1.0), **kwargs)


def served(obj, tmp_path):
    obj.save_pretrained(tmp_path)
    return PolicyServer(tmp_path)


def actions(answer):
    assert isinstance(answer, dict), answer
    return torch.tensor(answer["actions"], dtype=torch.float32)


def test_batch_equals_direct_act_and_both_flat_shapes_are_grouped(tmp_path):
    policy = mlp_policy()
    server = served(policy, tmp_path)
    obs = torch.randn(7, 2, 3)
    shapes = [obs[i] if i % 3 else obs[i].reshape(6) for i in range(7)]  # [2, 3] and [6] mixed
    items = [server.parse({"observation": s.tolist(), "seed": 10 + i}) for i, s in enumerate(shapes)]
    out = server.run(items)
    for i, a in enumerate(out):
        torch.testing.assert_close(actions(a), policy.act(obs[i:i + 1], generator=10 + i)[0], rtol=1e-5, atol=1e-6)
        assert a["seed"] == 10 + i
        # one act per shape: 3 observations given flat (i = 0, 3, 6), 4 as [2, 3]
        assert a["batch_size"] == (3 if i % 3 == 0 else 4)
    policy.act(obs[1:2], generator=11)  # energy: the chosen chunk's, as act reports it
    assert out[1]["energy"] == pytest.approx(float(policy.last_result.best_energy[0]), rel=1e-5, abs=1e-6)


def test_seed_alone_reproduces_noisy_act_exactly_and_unseeded_rows_leave_seeded_ones_alone(tmp_path):
    policy = EnergyPolicy.ibc(action_dim=2, obs_dim=3, horizon=2, n_obs_steps=2, hidden=(16, 16), candidates=8,
                              steps=5)  # Langevin: per-step noise
    assert policy.descent.noise != "none"
    server = served(policy, tmp_path)
    obs = torch.randn(3, 2, 3)
    items = [server.parse({"observation": obs[i].tolist(), "seed": 5 + i}) for i in range(3)]
    for i in range(3):  # served alone: every draw from the request's seed
        assert torch.equal(actions(server.run([items[i]])[0]), policy.act(obs[i:i + 1], generator=5 + i)[0])
    # without noise: seeded rows are their own, whatever else (unseeded) shares the batch
    plain = mlp_policy()
    server = served(plain, tmp_path / "plain")
    obs = torch.randn(4, 2, 3)
    items = [server.parse({"observation": obs[i].tolist(), **({"seed": i} if i % 2 == 0 else {})}) for i in range(4)]
    out = server.run(items)
    for i in (0, 2):
        torch.testing.assert_close(actions(out[i]), plain.act(obs[i:i + 1], generator=i)[0], rtol=1e-5, atol=1e-6)
    assert out[1]["seed"] is None and out[1]["batch_size"] == 4


def test_adapter_answers_predict_action_chunk(tmp_path):
    adapter = PolicyAdapter(mlp_policy(), n_action_steps=1,
                            observation_stats={"mean": torch.tensor([1.0, 0.0, -1.0]), "std": torch.tensor([0.5, 2.0, 1.0])},
                            action_stats={"min": torch.tensor([-3.0, 0.0]), "max": torch.tensor([3.0, 0.5])})
    server = served(adapter, tmp_path)
    assert server.info()["action_shape"] == [1, 2]
    obs = 3 * torch.randn(5, 2, 3)
    out = server.run([server.parse({"observation": obs[i].tolist(), "seed": i}) for i in range(5)])
    for i, a in enumerate(out):
        assert a["batch_size"] == 5
        torch.testing.assert_close(actions(a), adapter.predict_action_chunk(obs[i:i + 1], generator=i)[0],
                                   rtol=1e-5, atol=1e-6)


def test_ebt_policy_tokens(tmp_path):
    torch.manual_seed(0)
    model = EBTPolicy(action_dim=2, horizon=4, cond_dim=6, embed_dim=8, layers=1, heads=2, n_obs_steps=2)
    policy = EnergyPolicy.ebt_policy(model, candidates=3, max_steps=3)
    server = served(policy, tmp_path)
    tokens = [torch.randn(2, 6), torch.randn(2, 6), torch.randn(4, 6)]  # L = 2, 2, 4: two acts
    out = server.run([server.parse({"observation": t.tolist(), "seed": i}) for i, t in enumerate(tokens)])
    assert [a["batch_size"] for a in out] == [2, 2, 1]
    for i, (t, a) in enumerate(zip(tokens, out)):
        torch.testing.assert_close(actions(a), policy.act(t[None], generator=i)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RequestError, match=r"shape \[3, 6\].*L a multiple of n_obs_steps = 2"):
        server.parse({"observation": torch.randn(3, 6).tolist()})


@pytest.mark.parametrize("payload, reason", [
    ([1.0, 2.0], "must be a JSON object"),
    ({"obs": [1.0]}, "unknown fields ['obs']"),
    ({"seed": 1}, "no \"observation\""),
    ({"observation": [[1, 2, 3], [4, 5]]}, "observation is ragged"),
    ({"observation": [[1, 2, True], [4, 5, 6]]}, "observation[0][2] must be a number; got true"),
    ({"observation": [[1, 2, None], [4, 5, 6]]}, "observation[0][2] must be a number; got null"),
    ({"observation": [[1, 2, "3"], [4, 5, 6]]}, "observation[0][2] must be a number or a list; got str"),
    ({"observation": []}, "observation is an empty list"),
    ({"observation": 1.0}, "observation has shape []"),
    ({"observation": [[1, 2, 3]]}, "observation has shape [1, 3]; this policy takes one observation of shape "
                                   "[2, 3] (n_obs_steps, obs_dim) or [6] (context_dim)"),
    ({"observation": [[1, 2, 3], [4, 5, float("nan")]]}, "NaN, Inf"),
    ({"observation": [[1, 2, 3], [4, 5, 1e39]]}, "too large for torch.float32"),
    ({"observation": [1, 2, 3, 4, 5, 6], "seed": -1}, "seed must be an int in [0, 2**63)"),
    ({"observation": [1, 2, 3, 4, 5, 6], "seed": 1.5}, "seed must be an int"),
    ({"observation": [1, 2, 3, 4, 5, 6], "seed": True}, "seed must be an int"),
    ({"observation": [1, 2, 3, 4, 5, 6], "seed": 2 ** 63}, "seed must be an int"),
])
def test_bad_requests_are_refused_with_the_reason(tmp_path, payload, reason):
    server = served(mlp_policy(), tmp_path)
    with pytest.raises(RequestError) as e:
        server.parse(payload)
    assert e.value.status == 400 and reason in str(e.value)


def test_adapter_statistics_that_do_not_fit_are_refused(tmp_path):
    adapter = PolicyAdapter(mlp_policy(), observation_stats={"mean": torch.zeros(2, 3), "std": torch.ones(2, 3)})
    server = served(adapter, tmp_path)
    server.parse({"observation": torch.randn(2, 3).tolist()})
    with pytest.raises(RequestError, match="do not broadcast"):
        server.parse({"observation": torch.randn(6).tolist()})  # [6] fits the policy, not the statistics


def test_a_failing_batch_is_split_so_only_the_bad_item_fails(tmp_path):
    policy = mlp_policy()
    server = served(policy, tmp_path)
    obs = torch.randn(4, 2, 3)
    items = [server.parse({"observation": obs[i].tolist(), "seed": i}) for i in range(4)]
    # an item that skipped parse (its NaN is caught by act itself): the batch fails, then each runs alone
    items[2] = Item(observation=torch.full((2, 3), float("nan")), seed=2)
    out = server.run(items)
    assert isinstance(out[2], RequestError) and out[2].status == 400 and "NaN" in str(out[2])
    for i in (0, 1, 3):
        assert out[i]["batch_size"] == 1
        torch.testing.assert_close(actions(out[i]), policy.act(obs[i:i + 1], generator=i)[0], rtol=1e-5, atol=1e-6)


def test_model_dir_must_hold_a_policy_or_an_energy_with_its_inference_configuration(tmp_path):
    MLPEnergy(6, 6, hidden=(8,)).save_pretrained(tmp_path / "bare")
    for make in (PolicyServer, EnergyServer, make_server):
        with pytest.raises(ValueError, match="MLPEnergy saved without an inference configuration; save it with "
                                             r"save_pretrained\(dir, descent="):
            make(tmp_path / "bare")
        with pytest.raises(FileNotFoundError, match="is not a directory"):
            make(tmp_path / "missing")
    MLPEnergy(6, 6, hidden=(8,)).save_pretrained(tmp_path / "energy", candidates=2)
    mlp_policy().save_pretrained(tmp_path / "policy")
    assert type(make_server(tmp_path / "energy")) is EnergyServer
    assert type(make_server(tmp_path / "policy")) is PolicyServer
    with pytest.raises(ValueError, match="holds a bare energy; EnergyServer serves it"):
        PolicyServer(tmp_path / "energy")
    with pytest.raises(ValueError, match="holds a policy; PolicyServer serves it"):
        EnergyServer(tmp_path / "policy")


def test_cli_arguments():
    args = build_parser().parse_args(["serve", "some_dir", "--port", "8123", "--max-batch-size", "8",
                                      "--batch-wait-timeout-s", "0.002", "--replicas", "2"])
    assert (args.model_dir, args.host, args.port, args.max_batch_size, args.batch_wait_timeout_s, args.replicas,
            args.device) == ("some_dir", "127.0.0.1", 8123, 8, 0.002, 2, "cpu")


# -- bare energies: POST /minimize -------------------------------------------------------------------------

def mlp_energy_dir(tmp_path, config=None, K=5, name="energy"):
    torch.manual_seed(0)
    energy = MLPEnergy(4, 3, hidden=(16, 16), residual=True)
    config = Descent.gd(steps=4, step_size=0.1, lower=-1.0, upper=1.0) if config is None else config
    energy.save_pretrained(tmp_path / name, descent=config, candidates=K)
    return energy, config, K, EnergyServer(tmp_path / name)


def best(answer):
    assert isinstance(answer, dict), answer
    return torch.tensor(answer["y"], dtype=torch.float32)


def test_energy_batch_equals_direct_minimize(tmp_path):
    energy, cfg, K, server = mlp_energy_dir(tmp_path, Descent.gd(steps=4, step_size=0.1, lower=-1.0, upper=1.0,
                                                                 init="uniform"))
    x = torch.randn(6, 4)
    inits = {1: torch.rand(3) - 0.5, 4: torch.rand(K, 3) - 0.5}  # shared by the K candidates, or one per candidate
    payloads = []
    for i in range(6):
        p = {"context": x[i].tolist()}
        if i != 3:
            p["seed"] = 20 + i
        if i in inits:
            p["init"] = inits[i].tolist()
        payloads.append(p)
    out = server.run([server.parse(p) for p in payloads])
    for i, a in enumerate(out):
        assert a["batch_size"] == 6 and a["seed"] == payloads[i].get("seed")
        if i == 3:  # no seed: its candidates come from torch's global generator
            continue
        init = inits[i][None] if i in inits else None
        direct = pyebm.minimize(energy, x[i:i + 1], K, cfg, init=init, generator=20 + i)
        assert a["index"] == int(direct.best_index[0])
        torch.testing.assert_close(best(a), direct.best[0], rtol=1e-5, atol=1e-6)
        assert a["energy"] == pytest.approx(float(direct.best_energy[0]), rel=1e-5, abs=1e-6)
    info = server.info()
    assert info["route"] == "/minimize" and info["candidates"] == K and info["y_shape"] == [3]
    assert Descent.from_dict(info["descent"]) == cfg


@pytest.mark.parametrize("config", [Descent.langevin(steps=5, step_size=0.05, temperature=0.1),
                                    Descent.gd(steps=3, selection="sample", selection_temperature=0.05),
                                    Descent.ibc_dfo(lower=-1.0, upper=1.0, steps=2)],
                         ids=["langevin", "sample", "dfo"])
def test_energy_request_alone_reproduces_a_noisy_minimize_draw_for_draw(tmp_path, config):
    energy, cfg, K, server = mlp_energy_dir(tmp_path, config, K=6)
    x = torch.randn(3, 4)
    for i in range(3):
        payload = {"context": x[i].tolist(), "seed": 7 + i}
        direct = pyebm.minimize(energy, x[i:i + 1], K, cfg, generator=7 + i)
        a = server.run([server.parse(payload)])[0]
        assert a["batch_size"] == 1 and a["index"] == int(direct.best_index[0])
        assert torch.equal(best(a), direct.best[0])
        assert a["energy"] == float(direct.best_energy[0])
        # with an init: the seed's generator draws the noise from its start, as the direct call's does
        init = torch.rand(K, 3) - 0.5
        direct = pyebm.minimize(energy, x[i:i + 1], K, cfg, init=init[None], generator=7 + i)
        a = server.run([server.parse(dict(payload, init=init.tolist()))])[0]
        assert torch.equal(best(a), direct.best[0]) and a["index"] == int(direct.best_index[0])


def test_energy_seeded_rows_keep_their_candidates_in_a_batch(tmp_path):
    """Without further draws each row is its own call's, whatever shares its batch (seeded or not)."""
    energy, cfg, K, server = mlp_energy_dir(tmp_path)
    x = torch.randn(5, 4)
    out = server.run([server.parse({"context": x[i].tolist(), **({"seed": i} if i % 2 == 0 else {})})
                      for i in range(5)])
    for i in (0, 2, 4):
        direct = pyebm.minimize(energy, x[i:i + 1], K, cfg, generator=i)
        torch.testing.assert_close(best(out[i]), direct.best[0], rtol=1e-5, atol=1e-6)
    assert out[1]["seed"] is None and out[1]["batch_size"] == 5


def test_ebt_policy_energy_groups_by_context_shape(tmp_path):
    torch.manual_seed(0)
    model = EBTPolicy(action_dim=2, horizon=4, cond_dim=6, embed_dim=8, layers=1, heads=2, n_obs_steps=2)
    cfg = Descent.ebt_policy(max_steps=3)
    model.save_pretrained(tmp_path, descent=cfg, candidates=3)
    server = make_server(tmp_path)
    tokens = [torch.randn(2, 6), torch.randn(4, 6), torch.randn(2, 6)]
    out = server.run([server.parse({"context": t.tolist(), "seed": i}) for i, t in enumerate(tokens)])
    assert [a["batch_size"] for a in out] == [2, 1, 2]
    for i, (t, a) in enumerate(zip(tokens, out)):
        direct = pyebm.minimize(model, t[None], 3, cfg, generator=i)
        assert torch.tensor(a["y"]).shape == (4, 2)
        torch.testing.assert_close(best(a), direct.best[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(RequestError, match=r"shape \[3, 6\].*L a multiple of n_obs_steps = 2"):
        server.parse({"context": torch.randn(3, 6).tolist()})


def test_ebt_energy_takes_token_ids(tmp_path):
    torch.manual_seed(0)
    model = EBT(vocab_size=11, embedding_dim=8, num_transformer_blocks=1, multiheaded_attention_heads=2,
                context_length=6, dtype=torch.float64)  # float64: a softmax step of size 5 magnifies rounding
    cfg = Descent.ebt(steps=2, step_size=5.0)
    model.save_pretrained(tmp_path, descent=cfg, candidates=2)
    server = make_server(tmp_path)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8]]
    out = server.run([server.parse({"context": p, "seed": i}) for i, p in enumerate(prompts)])
    assert [a["batch_size"] for a in out] == [2, 2, 1]
    for i, (p, a) in enumerate(zip(prompts, out)):
        direct = pyebm.minimize(model, torch.tensor([p]), 2, cfg, generator=i)
        got = torch.tensor(a["y"], dtype=torch.float64)
        torch.testing.assert_close(got, direct.best[0], rtol=1e-9, atol=1e-12)
        assert a["index"] == int(direct.best_index[0])
    for payload, reason in [({"context": [1, 2.5]}, "token ids (ints)"),
                            ({"context": [1, 11]}, "in [0, vocab_size=11)"),
                            ({"context": [1] * 7}, "exceeds context_length=6"),
                            ({"context": [[1, 2]]}, "shape [1, 2]")]:
        with pytest.raises(RequestError, match=re.escape(reason)):
            server.parse(payload)


@pytest.mark.parametrize("payload, reason", [
    ([1.0], "must be a JSON object"),
    ({"observation": [1.0]}, "unknown fields ['observation']"),
    ({"seed": 1}, "no \"context\""),
    ({"context": [1, 2, 3]}, "context has shape [3]; this energy takes one context of shape [4] (context_dim)"),
    ({"context": [[1, 2, 3, 4]]}, "context has shape [1, 4]"),
    ({"context": [1, 2, "3", 4]}, "context[2] must be a number or a list; got str"),
    ({"context": [1, 2, float("inf"), 4]}, "context contains NaN, Inf"),
    ({"context": [1, 2, 3, 4], "init": [1, 2]}, "init has shape [2]; expected [3] (shared by the 5 candidates) or "
                                                "[5, 3]"),
    ({"context": [1, 2, 3, 4], "init": [[1, 2, 3]] * 4}, "init has shape [4, 3]"),
    ({"context": [1, 2, 3, 4], "init": [1, float("nan"), 3]}, "init contains NaN"),
    ({"context": [1, 2, 3, 4], "init": [1, 2, None]}, "init[2] must be a number; got null"),
    ({"context": [1, 2, 3, 4], "seed": -3}, "seed must be an int in [0, 2**63)"),
])
def test_bad_energy_requests_are_refused_with_the_reason(tmp_path, payload, reason):
    server = mlp_energy_dir(tmp_path)[3]
    with pytest.raises(RequestError) as e:
        server.parse(payload)
    assert e.value.status == 400 and reason in str(e.value)


def test_a_failing_energy_batch_is_split_so_only_the_bad_item_fails(tmp_path):
    energy, cfg, K, server = mlp_energy_dir(tmp_path)
    x = torch.randn(4, 4)
    items = [server.parse({"context": x[i].tolist(), "seed": i}) for i in range(4)]
    # an item that skipped parse (a float64 context for a float32 energy): the batch fails, then each runs alone
    items[1] = EnergyItem(context=x[1].double(), init=None, seed=1)
    out = server.run(items)
    assert isinstance(out[1], RequestError) and out[1].status == 400 and "float64" in str(out[1])
    for i in (0, 2, 3):
        assert out[i]["batch_size"] == 1
        direct = pyebm.minimize(energy, x[i:i + 1], K, cfg, generator=i)
        assert torch.equal(best(out[i]), direct.best[0])


def test_example_requests_are_accepted(tmp_path):
    _, _, _, server = mlp_energy_dir(tmp_path)
    g = torch.Generator().manual_seed(0)
    assert server.run([server.parse(server.example_request(g))])[0]["batch_size"] == 1
    policy = served(mlp_policy(), tmp_path / "policy")
    assert policy.run([policy.parse(policy.example_request(g))])[0]["batch_size"] == 1
