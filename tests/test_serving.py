"""pyebm.serving without Ray: the request checks, batching by shape, seeds and the split of a failing batch.

``PolicyServer`` / ``EnergyServer`` / ``EBTServer`` is what each Ray Serve replica runs
(``tests/test_serving_ray.py`` runs them behind HTTP). Every answer is compared with a direct ``act`` /
``predict_action_chunk`` / ``minimize`` / ``EBT.generate`` / ``EBT.think`` call on the same observation,
context or prompt.
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
from pyebm.models import EBTInference
from pyebm.serving import (EBTServer, EnergyItem, EnergyServer, GenerateItem, Item, PolicyServer,
                           RequestError, make_server)

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
    server = make_server(tmp_path)  # an EBTServer: /minimize next to /generate and /think
    assert type(server) is EBTServer and server.routes == ("generate", "think", "minimize")
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8]]
    out = server.run([server.parse({"context": p, "seed": i}, "minimize") for i, p in enumerate(prompts)])
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
            server.parse_route("minimize", payload)
    assert type(EnergyServer(tmp_path)) is EnergyServer  # the minimize server alone, as before


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


# -- EBT: POST /generate and POST /think ---------------------------------------------------------------------

def ebt_dir(tmp_path, inference=None, name="ebt", **kwargs):
    """A tiny float64 EBT (float64: a batched call rounds differently from a one-prompt call, and in float64
    that difference, about 1e-12, cannot flip a token between two candidates unless they tie)."""
    torch.manual_seed(0)
    model = EBT(vocab_size=23, embedding_dim=16, num_transformer_blocks=1, multiheaded_attention_heads=2,
                context_length=12, mcmc_step_size=2.0, dtype=torch.float64, **kwargs)
    model.save_pretrained(tmp_path / name, inference=inference)
    return EBT.from_pretrained(tmp_path / name), make_server(tmp_path / name)


def test_ebt_generate_batch_equals_direct_calls_greedy_and_seeded(tmp_path):
    saved = EBTInference(samples=2, temperature=1.5, top_p=0.95)  # sampled by default
    model, server = ebt_dir(tmp_path, saved, langevin_dynamics_noise=0.2)  # noise: draws every step as well
    assert type(server) is EBTServer and server.routes == ("generate", "think")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 23, (4,), generator=g).tolist() for _ in range(6)]
    payloads = [{"prompt": p, "max_new_tokens": 5, "seed": 100 + i} for i, p in enumerate(prompts)]
    payloads[2]["seed"] = None  # no seed: its draws from torch's global generator, the others' untouched
    payloads += [{"prompt": p, "max_new_tokens": 5, "seed": 200 + i, "temperature": 0}  # greedy
                 for i, p in enumerate(prompts[:3])]
    out = server.run([server.parse(p) for p in payloads])
    assert [a["batch_size"] for a in out] == [6] * 6 + [3] * 3
    for i, (p, a) in enumerate(zip(payloads, out)):
        assert a["seed"] == p["seed"] and a["stop"] == "length" and len(a["tokens"]) == 5
        if p["seed"] is None:
            continue
        opts = {"temperature": 0.0} if i >= 6 else {}
        direct = model.generate(torch.tensor([p["prompt"]]), 5, generator=p["seed"], **opts)
        assert a["tokens"] == direct[0, 4:].tolist(), i
    # the sampled answers depend on their seeds (the comparison above can fail)
    assert len({tuple(a["tokens"]) for a in out[:6]}) > 1
    again = server.run([server.parse(dict(payloads[0], seed=7))])[0]
    assert again["batch_size"] == 1
    assert again["tokens"] == model.generate(torch.tensor([prompts[0]]), 5, generator=7)[0, 4:].tolist()


def test_ebt_requests_are_grouped_by_length_max_new_tokens_and_options(tmp_path):
    model, server = ebt_dir(tmp_path)
    items = [server.parse(p) for p in [
        {"prompt": [1, 2, 3], "max_new_tokens": 2, "seed": 0},
        {"prompt": [4, 5, 6], "max_new_tokens": 2, "seed": 1},
        {"prompt": [4, 5], "max_new_tokens": 2, "seed": 2},                             # another length
        {"prompt": [1, 2, 3], "max_new_tokens": 3, "seed": 3},                          # another max_new_tokens
        {"prompt": [1, 2, 3], "max_new_tokens": 2, "seed": 4, "samples": 3},            # other options
        {"prompt": [7, 8, 9], "max_new_tokens": 2, "seed": 5, "samples": 3},
        {"prompt": [7, 8, 9], "max_new_tokens": 2, "seed": 6, "top_p": 0.5},            # top_p unused when greedy
        {"prompt": [7, 8, 9], "max_new_tokens": 2, "seed": 7, "temperature": 0.5, "top_p": 0.5},
        {"prompt": [7, 8, 9], "max_new_tokens": 2, "seed": 8, "alpha": 1.0, "steps": 3, "select": "max",
         "noise": 0.0, "accept_lower": True},
        {"prompt": [1, 2, 3], "max_new_tokens": 2, "seed": 9, "samples": None},         # null: the default
    ]]
    out = server.run(items)
    assert [a["batch_size"] for a in out] == [4, 4, 1, 1, 2, 2, 4, 1, 1, 4]
    for it, a in zip(items, out):
        direct = model.generate(it.prompt[None], it.max_new_tokens, generator=it.seed,
                                **it.options.generate_kwargs())
        assert a["tokens"] == direct[0, it.prompt.numel():].tolist()
    assert items[8].options == EBTInference(alpha=1.0, steps=3, select="max", noise=0.0, accept_lower=True)


def test_ebt_eos_ends_each_answer_at_its_own_eos(tmp_path):
    model, server = ebt_dir(tmp_path, EBTInference(temperature=2.0))
    prompts = [[1, 2, 3], [3, 2, 1], [5, 5, 5], [9, 1, 4]]
    full = [model.generate(torch.tensor([p]), 6, generator=i)[0, 3:].tolist() for i, p in enumerate(prompts)]
    eos = full[0][2]  # the first prompt stops after 3 tokens (or earlier, if it drew eos before)
    out = server.run([server.parse({"prompt": p, "max_new_tokens": 6, "seed": i, "eos_token_id": eos})
                      for i, p in enumerate(prompts)])
    for i, (p, a) in enumerate(zip(prompts, out)):
        direct = model.generate(torch.tensor([p]), 6, generator=i, eos_token_id=eos)[0, 3:].tolist()
        assert a["tokens"] == direct and a["batch_size"] == 4
        assert a["stop"] == ("eos" if eos in full[i] else "length")
        assert direct == (full[i][:full[i].index(eos) + 1] if eos in full[i] else full[i])
    assert out[0]["stop"] == "eos" and len(out[0]["tokens"]) <= 3


def test_ebt_think_answers_the_next_token_distribution(tmp_path):
    model, server = ebt_dir(tmp_path, EBTInference(samples=3, select="max_gap"), langevin_dynamics_noise=0.3)
    contexts = [[1, 2, 3, 4], [5, 6, 7, 8], [2, 2, 2, 2]]
    payloads = [{"context": c, "seed": 10 + i, "top_k": 1 + i} for i, c in enumerate(contexts)]
    payloads[1]["full_logits"] = True
    out = server.run([server.parse(p, "think") for p in payloads])
    for i, (p, a) in enumerate(zip(payloads, out)):
        direct = model.think(torch.tensor([p["context"]]), generator=p["seed"])
        logits = direct.logits[0]
        probs = torch.softmax(logits, -1)
        top = torch.topk(probs, p["top_k"])
        assert a["top_tokens"] == top.indices.tolist() and a["batch_size"] == 3 and a["seed"] == 10 + i
        torch.testing.assert_close(torch.tensor(a["top_probs"], dtype=torch.float64), top.values, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(torch.tensor(a["top_logits"], dtype=torch.float64), logits[top.indices],
                                   rtol=1e-9, atol=1e-9)
        assert a["energy"] == pytest.approx(float(direct.energy[0]), rel=1e-9, abs=1e-12)
        assert a["initial_energy"] == pytest.approx(float(direct.initial_energy[0]), rel=1e-9, abs=1e-12)
        assert a["sample"] == int(direct.sample[0])
        assert ("logits" in a) == (i == 1)
    torch.testing.assert_close(torch.tensor(out[1]["logits"], dtype=torch.float64),
                               model.think(torch.tensor([contexts[1]]), generator=11).logits[0], rtol=1e-9, atol=1e-9)
    assert len(out[0]["top_tokens"]) == 1 and len(out[2]["top_tokens"]) == 3
    # think and generate requests of one batch are separate calls; options split think requests too
    items = [server.parse({"context": [1, 2, 3]}, "think"), server.parse({"prompt": [1, 2, 3], "max_new_tokens": 1}),
             server.parse({"context": [1, 2, 3], "samples": 1}, "think"), server.parse({"context": [3, 2, 1]}, "think")]
    assert [a["batch_size"] for a in server.run(items)] == [2, 1, 1, 2]
    assert server.parse({"context": [1]}, "think").top_k == 5


@pytest.mark.parametrize("route, payload, reason", [
    ("generate", [1, 2], "must be a JSON object"),
    ("generate", {"prompt": [1, 2]}, "no \"max_new_tokens\""),
    ("generate", {"max_new_tokens": 2}, "no \"prompt\""),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "top_k": 3}, "unknown fields ['top_k']; POST /generate takes"),
    ("generate", {"prompt": [1, 2.0], "max_new_tokens": 2}, "prompt[1] must be a token id (an int); got 2.0"),
    ("generate", {"prompt": [1, "2"], "max_new_tokens": 2}, "prompt[1] must be a token id (an int); got '2'"),
    ("generate", {"prompt": [1, True], "max_new_tokens": 2}, "prompt[1] must be a token id (an int); got True"),
    ("generate", {"prompt": [[1, 2]], "max_new_tokens": 2}, "prompt[0] must be a token id"),
    ("generate", {"prompt": [1, 23], "max_new_tokens": 2}, "prompt[1] = 23 is not a token id: ids are in "
                                                           "[0, vocab_size=23)"),
    ("generate", {"prompt": [-1], "max_new_tokens": 2}, "prompt[0] = -1 is not a token id"),
    ("generate", {"prompt": [], "max_new_tokens": 2}, "prompt must be a non-empty list of token ids"),
    ("generate", {"prompt": "hello", "max_new_tokens": 2}, "prompt must be a non-empty list of token ids"),
    ("generate", {"prompt": [1] * 13, "max_new_tokens": 1}, "prompt has 13 tokens; this model's context_length is 12"),
    ("generate", {"prompt": [1] * 10, "max_new_tokens": 4}, "max_new_tokens = 4 after a prompt of 10 tokens exceeds "
                                                            "context_length=12 (at most 3 for this prompt)"),
    ("generate", {"prompt": [1], "max_new_tokens": 0}, "max_new_tokens must be an int >= 1; got 0"),
    ("generate", {"prompt": [1], "max_new_tokens": 2.5}, "max_new_tokens must be an int >= 1; got 2.5"),
    ("generate", {"prompt": [1], "max_new_tokens": "3"}, "max_new_tokens must be an int >= 1"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "seed": -1}, "seed must be an int in [0, 2**63)"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "temperature": -1}, "temperature must be a finite number >= 0"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "temperature": "hot"}, "temperature must be a finite number"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "top_p": 1.5}, "top_p must be a number in (0, 1]"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "eos_token_id": 23}, "eos_token_id = 23 is not a token id"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "eos_token_id": 1.0}, "eos_token_id must be a token id"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "samples": 65}, "samples must be at most 64 on this server"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "samples": 0}, "samples must be an int >= 1"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "steps": 65}, "steps must be at most 64 on this server"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "steps": True}, "steps must be an int >= 1"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "select": "best"}, "select must be one of"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "alpha": 0}, "alpha must be a finite number > 0"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "noise": -0.5}, "noise must be a finite number >= 0"),
    ("generate", {"prompt": [1], "max_new_tokens": 2, "accept_lower": 1}, "accept_lower must be true or false"),
    ("think", {"prompt": [1]}, "unknown fields ['prompt']; POST /think takes"),
    ("think", {"context": [1], "max_new_tokens": 2}, "unknown fields ['max_new_tokens']"),
    ("think", {"seed": 1}, "no \"context\""),
    ("think", {"context": [1, 99]}, "context[1] = 99 is not a token id"),
    ("think", {"context": [1], "top_k": 0}, "top_k must be an int in [1, vocab_size=23]"),
    ("think", {"context": [1], "top_k": 24}, "top_k must be an int in [1, vocab_size=23]"),
    ("think", {"context": [1], "full_logits": 1}, "full_logits must be true or false"),
    ("think", {"context": [1], "temperature": 1.0}, "unknown fields ['temperature']"),
])
def test_bad_ebt_requests_are_refused_with_the_reason(tmp_path, route, payload, reason):
    server = ebt_dir(tmp_path)[1]
    with pytest.raises(RequestError) as e:
        server.parse_route(route, payload)
    assert e.value.status == 400 and reason in str(e.value)


def test_ebt_routes_info_and_limits(tmp_path):
    model, server = ebt_dir(tmp_path, EBTInference(samples=80, steps=3))
    info = server.info()
    assert info["routes"] == ["/generate", "/think"] and info["route"] == "/generate" and "minimize" not in info
    assert (info["vocab_size"], info["context_length"]) == (23, 12)
    assert EBTInference.from_dict(info["inference"]) == EBTInference(samples=80, steps=3)
    assert info["limits"] == {"max_new_tokens": 12, "max_steps": 64, "max_samples": 80, "max_top_k": 23}
    server.parse({"prompt": [1], "max_new_tokens": 2, "samples": 80})  # the saved default raises the limit
    for route, status in (("minimize", 404), ("act", 404)):
        with pytest.raises(RequestError, match=f"no route /{route}") as e:
            server.parse_route(route, {"context": [1]})
        assert e.value.status == status
    limited = EBTServer(tmp_path / "ebt", max_new_tokens=2, max_steps=4, max_samples=2)
    assert limited.info()["limits"] == {"max_new_tokens": 2, "max_steps": 4, "max_samples": 80, "max_top_k": 23}
    with pytest.raises(RequestError, match="max_new_tokens must be at most 2 on this server; got 3"):
        limited.parse({"prompt": [1], "max_new_tokens": 3})
    with pytest.raises(ValueError, match="max_steps must be an int >= 1"):
        EBTServer(tmp_path / "ebt", max_steps=0)
    mlp_policy().save_pretrained(tmp_path / "policy")
    with pytest.raises(ValueError, match="does not hold an EBT"):
        EBTServer(tmp_path / "policy")
    with pytest.raises(ValueError, match="EBT saved without an inference configuration for minimize"):
        EnergyServer(tmp_path / "ebt")
    from pyebm.serving import model_routes
    assert model_routes(tmp_path / "ebt") == ["generate", "think"] and model_routes(tmp_path / "policy") == ["act"]


def test_a_failing_ebt_batch_is_split_so_only_the_bad_item_fails(tmp_path):
    model, server = ebt_dir(tmp_path)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    items = [server.parse({"prompt": p, "max_new_tokens": 3, "seed": i}) for i, p in enumerate(prompts)]
    # an item that skipped parse (a token id out of range, which generate itself refuses): split, run alone
    items[1] = GenerateItem(prompt=torch.tensor([4, 5, 99]), max_new_tokens=3, options=items[0].options, seed=1)
    out = server.run(items)
    assert isinstance(out[1], RequestError) and out[1].status == 400 and "vocab_size=23" in str(out[1])
    for i in (0, 2):
        assert out[i]["batch_size"] == 1
        assert out[i]["tokens"] == model.generate(torch.tensor([prompts[i]]), 3, generator=i)[0, 3:].tolist()
    assert server.run([server.parse(server.example_request(torch.Generator().manual_seed(0)))])[0]["batch_size"] == 1
