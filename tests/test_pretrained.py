"""save_pretrained / from_pretrained (pyebm.pretrained) and Descent's JSON form.

Every model class of tests/test_contracts.py is saved after it has run its fastest path, loaded in this
process and in a fresh one, and must give the same results bit for bit (the same weights through the same
path: the computations are the same operations in the same order). Bad directories must fail with errors
that say what is wrong.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import random
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils import parametrize

import pyebm
from pyebm import Descent, MLPEnergy, minimize
from pyebm.adapter import PolicyAdapter
from pyebm.models import EBT, EBTPolicy
from pyebm.policies import EnergyPolicy
from pyebm.pretrained import CONFIG_NAME, WEIGHTS_NAME, from_pretrained

from test_contracts import CASE_IDS, CASES, used

safetensors = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def assert_equal(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), f"output {i} differs"


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# -- Descent as JSON ----------------------------------------------------------------------------------

PRESETS = [n for n, v in vars(Descent).items() if isinstance(v, classmethod) and n not in ("from_dict", "from_json")]


def test_every_preset_is_covered():
    assert set(PRESETS) >= {"gd", "langevin", "ibc_langevin", "ibc_dfo", "ebt", "ebt_policy", "energy_matching"}


def round_trip(cfg: Descent):
    text = cfg.to_json()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text)  # standard JSON
    for back in (Descent.from_dict(cfg.to_dict()), Descent.from_json(text),
                 Descent.from_dict(json.loads(json.dumps(cfg.to_dict())))):
        assert back == cfg
        for f in cfg.__dataclass_fields__:  # same values of the same types (tuples stay tuples, ints ints)
            assert type(getattr(back, f)) is type(getattr(cfg, f)), f
            assert repr(getattr(back, f)) == repr(getattr(cfg, f)), f


@pytest.mark.parametrize("preset", PRESETS)
def test_descent_json_round_trip_presets(preset):
    make = getattr(Descent, preset)
    round_trip(make())
    extra = {"ibc_langevin": dict(lower=[-1.0, -2.0], upper=[1.0, 0.5], grad_clip=3.0),
             "ibc_dfo": dict(lower=-0.5, upper=[[1.0, 2.0]]),
             "ebt": dict(noise=0.3, grad_clamp=2.0, accept_if_lower=True, selection="max_gap"),
             "ebt_policy": dict(noise=0.1, coupled=True, grad_clamp=1.0),
             "energy_matching": dict(tau_star=0.7, lower=-float("inf"), upper=float("inf"))}.get(preset)
    if extra:
        round_trip(make(**extra))


def random_event_value(rng: random.Random, positive=False):
    kind = rng.choice(["none", "scalar", "vec", "mat"])
    lo = 0.01 if positive else -3.0
    draw = (lambda: rng.uniform(0.01, 3.0)) if positive else (lambda: rng.choice([rng.uniform(lo, 3.0), -math.inf]))
    if kind == "none":
        return None
    if kind == "scalar":
        return draw()
    if kind == "vec":
        return [draw() for _ in range(3)]
    return [[draw() for _ in range(3)] for _ in range(2)]


def random_descent(rng: random.Random) -> dict:
    f = rng.uniform
    opts = dict(
        method=rng.choice(["gd", "gd", "dfo"]), steps=rng.randint(1, 50), step_size=f(1e-4, 10),
        step_schedule=rng.choice(["constant", "polynomial", "exponential", "cosine", "energy"]),
        step_size_end=f(0, 1), step_power=f(0.1, 3), step_decay=f(0.1, 1), energy_temperature=f(0.1, 10),
        grad_scale=f(0.1, 2), noise=rng.choice(["none", "langevin", "step", "additive", "pre"]),
        noise_scale=f(0, 2), noise_schedule=rng.choice(["constant", "polynomial", "exponential", "cosine", "ramp"]),
        noise_scale_end=f(0, 1), noise_power=f(0.1, 3), noise_decay=f(0.1, 1),
        noise_ramp=tuple(sorted((f(0, 20), f(0, 20)))), momentum=rng.choice([0.0, f(0, 0.99)]),
        grad_clip=rng.choice([None, f(0.1, 5)]), grad_clip_norm=rng.choice([None, f(0.1, 5)]),
        step_clip=random_event_value(rng, positive=True), bound_each_step=rng.random() < 0.5,
        normalize=rng.choice([None, "rms", "rms_all"]), normalize_eps=rng.choice([None, f(1e-8, 1e-3)]),
        project=rng.choice([None, "softmax"]), accept_if_lower=rng.random() < 0.3, tol=rng.choice([0.0, f(0, 1)]),
        tol_on=rng.choice(["grad_norm", "energy_change"]), tol_scope=rng.choice(["candidate", "all"]),
        tol_final_step=rng.random() < 0.5, check_every=rng.randint(0, 8),
        selection=rng.choice(["min", "max", "max_gap", "sample"]), selection_temperature=f(0.1, 5),
        init=rng.choice(["normal", "uniform", "zeros"]), init_scale=f(0.1, 3),
        integrator=rng.choice(["euler", "heun"]), resample_temperature=f(0.1, 5))
    opts["nesterov"] = opts["momentum"] > 0 and rng.random() < 0.5
    lower = random_event_value(rng)
    if lower is not None and rng.random() < 0.7:  # an upper bound above the lower one, same shape
        up = torch.as_tensor(lower, dtype=torch.float64).clamp(min=-3.0) + torch.rand(
            torch.as_tensor(lower).shape, generator=torch.Generator().manual_seed(rng.randint(0, 10**6)),
            dtype=torch.float64) * 2
        opts["upper"] = up.tolist() if up.dim() else float(up)
    opts["lower"] = lower
    keep = rng.sample(sorted(opts), rng.randint(1, len(opts)))  # some options left at their defaults
    return {k: opts[k] for k in keep}


def test_descent_json_round_trip_random_fields():
    rng = random.Random(0)
    made = 0
    for _ in range(3000):
        try:
            cfg = Descent(**random_descent(rng))
        except ValueError:
            continue  # options that exclude each other
        round_trip(cfg)
        made += 1
    assert made >= 300


def test_descent_from_dict_errors():
    with pytest.raises(ValueError, match="unknown options.*'stepz'"):
        Descent.from_dict({"stepz": 3})
    with pytest.raises(TypeError, match="mapping"):
        Descent.from_dict([("steps", 3)])
    with pytest.raises(ValueError, match="not valid JSON"):
        Descent.from_json("{steps: 3")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        Descent.from_dict({"steps": 0})
    with pytest.raises(TypeError, match="step_size must be a finite number"):
        Descent.from_dict({"step_size": "inf"})
    assert Descent.from_dict({}) == Descent()


# -- save, load, same results -------------------------------------------------------------------------

def module_of(obj):
    return obj if isinstance(obj, torch.nn.Module) else obj.energy


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_save_after_the_fast_path_and_load(case, tmp_path):
    obj, first = used(case)
    obj.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = type(obj).from_pretrained(tmp_path)
    assert type(loaded) is type(obj)
    assert_same_state(module_of(loaded), module_of(obj))
    case.assert_fast_path(loaded)
    assert_equal(case.fast(loaded), case.fast(obj))
    assert_equal(case.fast(loaded), first)
    if isinstance(obj, EnergyPolicy):
        assert loaded.descent == obj.descent
        for name in ("candidates", "horizon", "action_dim", "n_obs_steps", "n_action_steps", "window_start",
                     "warm_start", "recovery_threshold", "max_retries", "check_every", "final_energy", "flat"):
            assert getattr(loaded, name) == getattr(obj, name), name
        assert torch.equal(loaded.lower, obj.lower) if obj.lower is not None else loaded.lower is None
    # the generic loader gives the same
    again = from_pretrained(tmp_path)
    assert_equal(case.fast(again), first)


def test_saving_reads_the_current_weights_not_a_stale_pack(tmp_path):
    case = CASES[0]
    obj, first = used(case)
    with torch.no_grad():
        obj.head.weight.mul_(1.5)  # in place, after the fast path packed the weights
    now = case.fast(obj)
    obj.save_pretrained(tmp_path)
    assert_equal(case.fast(MLPEnergy.from_pretrained(tmp_path)), now)


def test_minimize_with_a_generator_and_energies_equal(tmp_path):
    torch.manual_seed(0)
    m = MLPEnergy(5, 3, hidden=(16, 16), residual=True, dtype=torch.float32)
    x = torch.randn(4, 5)
    cfg = Descent.langevin(steps=6, step_size=0.02, temperature=0.5)
    want = minimize(m, x, 7, cfg, generator=11)
    m.save_pretrained(tmp_path)
    got = minimize(MLPEnergy.from_pretrained(tmp_path), x, 7, cfg, generator=11)
    assert_equal([got.y, got.energy, got.best, got.best_index], [want.y, want.energy, want.best, want.best_index])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_is_kept(tmp_path, dtype):
    m = EBTPolicy(action_dim=2, horizon=3, cond_dim=6, embed_dim=8, layers=1, heads=2, dtype=dtype)
    m.save_pretrained(tmp_path)
    loaded = EBTPolicy.from_pretrained(tmp_path)
    assert loaded.dtype == dtype
    assert_same_state(loaded, m)


def test_mixed_dtypes_are_kept_per_tensor(tmp_path):
    m = MLPEnergy(3, 2, hidden=(4, 4), dtype=torch.float32)
    m.head.double()
    m.save_pretrained(tmp_path)
    loaded = MLPEnergy.from_pretrained(tmp_path)
    assert loaded.head.weight.dtype == torch.float64 and loaded.y_proj.weight.dtype == torch.float32
    assert_same_state(loaded, m)


def test_tied_weights_are_written_once_and_tied_again(tmp_path):
    torch.manual_seed(0)
    m = MLPEnergy(4, 3, hidden=(8, 8, 8), dtype=torch.float64)
    m.layers[1].weight = m.layers[0].weight  # tied
    x, y = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    want = m.energy_and_grad(m.prepare(x), y)  # the fast path, on tied weights
    m.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["tied"] == {"layers.1.weight": "layers.0.weight"}
    assert "layers.1.weight" not in safetensors.load_file(tmp_path / WEIGHTS_NAME)
    loaded = MLPEnergy.from_pretrained(tmp_path)
    assert loaded.layers[1].weight is loaded.layers[0].weight
    assert_equal(list(loaded.energy_and_grad(loaded.prepare(x), y)), list(want))


def test_partly_overlapping_tensors_are_written_as_copies(tmp_path):
    m = MLPEnergy(4, 3, hidden=(8, 8), dtype=torch.float64)
    big = torch.randn(2, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        m.layers[0].weight = torch.nn.Parameter(big[0])  # a view of part of a storage...
        m.y_proj.weight = torch.nn.Parameter(big[1, :, :3])  # ...and another view of the same storage
    m.save_pretrained(tmp_path)
    loaded = MLPEnergy.from_pretrained(tmp_path)
    assert_same_state(loaded, m)


def test_policy_adapter_round_trip(tmp_path):
    torch.manual_seed(0)
    energy = MLPEnergy(2 * 3, 4 * 2, hidden=(16, 16), residual=True, dtype=torch.float64)
    policy = EnergyPolicy.ibc(energy, action_dim=2, obs_dim=3, horizon=4, n_obs_steps=2, candidates=8, steps=3)
    adapter = PolicyAdapter(policy, n_action_steps=3, observation_stats={"mean": torch.randn(3), "std": torch.rand(3)},
                            action_stats={"min": [-2.0, -1.0], "max": [2.0, 3.0]}, eps=1e-6)
    adapter.save_pretrained(tmp_path)
    loaded = PolicyAdapter.from_pretrained(tmp_path)
    assert loaded.n_action_steps == 3 and loaded.eps == 1e-6
    for a, b in ((loaded.observation_norm, adapter.observation_norm), (loaded.action_norm, adapter.action_norm)):
        assert a.mode == b.mode and all(torch.equal(a.stats[k], b.stats[k]) for k in b.keys)
    obs = torch.randn(5, 2, 3, dtype=torch.float64)
    for step in range(7):
        assert torch.equal(loaded.select_action(obs, generator=step), adapter.select_action(obs, generator=step))


# -- a fresh process ----------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, torch
    import pyebm
    from test_contracts import CASES
    out, dirs = sys.argv[1], sys.argv[2:]
    results = {}
    for case, d in zip(CASES, dirs):
        results[case.name] = case.fast(pyebm.pretrained.from_pretrained(d))
    adapter = pyebm.pretrained.from_pretrained(dirs[-1])
    obs = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    results["adapter"] = [adapter.select_action(obs, generator=k) for k in range(3)]
    torch.save(results, out)
""")


def test_load_in_a_fresh_process(tmp_path):
    want = {}
    dirs = []
    for case in CASES:
        obj, first = used(case)
        d = tmp_path / case.name.replace("[", "_").replace("]", "_")
        obj.save_pretrained(d)
        dirs.append(str(d))
        want[case.name] = first
    policy = CASES[3].make()  # the EBT-Policy preset
    adapter = PolicyAdapter(policy, observation_stats={"mean": 0.5, "std": 2.0},
                            action_stats={"mean": torch.arange(3.0), "std": torch.ones(3)})
    obs = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    want["adapter"] = [adapter.select_action(obs, generator=k) for k in range(3)]
    adapter.reset()
    adapter.save_pretrained(tmp_path / "adapter")
    dirs.append(str(tmp_path / "adapter"))
    out = tmp_path / "out.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(out)] + dirs, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert_equal(got[name], want[name])


# -- bad directories ----------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    MLPEnergy(4, 3, hidden=(8, 8)).save_pretrained(tmp_path)
    return tmp_path


def edit_config(d, change):
    config = json.loads((d / CONFIG_NAME).read_text())
    change(config)
    (d / CONFIG_NAME).write_text(json.dumps(config))


def test_missing_directory_and_files(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        MLPEnergy.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        MLPEnergy.from_pretrained(empty)
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        MLPEnergy.from_pretrained(saved)


def test_unknown_format_version(saved):
    edit_config(saved, lambda c: c.update(format_version=2))
    with pytest.raises(ValueError, match="format_version 2; this pyebm reads format_version 1"):
        MLPEnergy.from_pretrained(saved)
    edit_config(saved, lambda c: c.pop("format_version"))
    with pytest.raises(ValueError, match="format_version None"):
        MLPEnergy.from_pretrained(saved)
    edit_config(saved, lambda c: c.pop("format"))
    with pytest.raises(ValueError, match="not a pyebm configuration"):
        MLPEnergy.from_pretrained(saved)
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MLPEnergy.from_pretrained(saved)


def test_unknown_architecture_and_wrong_class(saved):
    with pytest.raises(ValueError, match="holds the architecture MLPEnergy, not EBT"):
        EBT.from_pretrained(saved)
    with pytest.raises(ValueError, match="not EnergyPolicy"):
        EnergyPolicy.from_pretrained(saved)
    edit_config(saved, lambda c: c.update(architecture="MLPEnergy2"))
    with pytest.raises(ValueError, match="unknown architecture 'MLPEnergy2'"):
        pyebm.pretrained.from_pretrained(saved)


def test_invalid_constructor_arguments(saved):
    edit_config(saved, lambda c: c["config"].update(activation="nope"))
    with pytest.raises(ValueError, match="saved MLPEnergy configuration .* is not valid"):
        MLPEnergy.from_pretrained(saved)
    edit_config(saved, lambda c: c["config"].update(activation="silu", surprise=1))
    with pytest.raises(ValueError, match="surprise"):
        MLPEnergy.from_pretrained(saved)


def test_mismatched_shapes(saved):
    edit_config(saved, lambda c: c["config"].update(hidden=[8, 9]))
    with pytest.raises(ValueError, match=r"(?s)other shapes.*layers.0.weight: the architecture has \[9, 8\], the file "
                                         r"\[8, 8\]"):
        MLPEnergy.from_pretrained(saved)


def test_missing_and_unexpected_tensors(saved):
    tensors = safetensors.load_file(saved / WEIGHTS_NAME)
    tensors["extra"] = tensors.pop("head.bias")
    safetensors.save_file(tensors, saved / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"missing tensors: \['head.bias'\]\n  unexpected tensors: \['extra'\]"):
        MLPEnergy.from_pretrained(saved)
    (saved / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        MLPEnergy.from_pretrained(saved)


def test_what_save_refuses(tmp_path):
    m = MLPEnergy(4, 3, hidden=(8, 8))
    parametrize.register_parametrization(m.head, "weight", torch.nn.Identity())
    with pytest.raises(ValueError, match="parametrizations"):
        m.save_pretrained(tmp_path / "a")

    class Mine(MLPEnergy):
        pass

    with pytest.raises(TypeError, match="Mine is not one of pyebm's architectures"):
        Mine(4, 3).save_pretrained(tmp_path / "b")
    with pytest.raises(TypeError, match="directory must be a path"):
        MLPEnergy(4, 3).save_pretrained(3)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written


# -- an energy's inference configuration -----------------------------------------------------------------

def test_energy_saved_with_its_inference_configuration(tmp_path):
    from pyebm.pretrained import inference_config

    torch.manual_seed(0)
    m = MLPEnergy(4, 3, hidden=(8, 8))
    cfg = Descent.ibc_langevin(lower=[-1.0, -2.0, -0.5], upper=1.0, steps=3)
    m.save_pretrained(tmp_path / "a", descent=cfg, candidates=7)
    got_cfg, K = inference_config(tmp_path / "a")
    assert got_cfg == cfg and K == 7
    x = torch.randn(2, 4)
    loaded = MLPEnergy.from_pretrained(tmp_path / "a")  # the entry does not change what loads
    assert torch.equal(minimize(loaded, x, K, got_cfg, generator=0).best, minimize(m, x, K, cfg, generator=0).best)
    m.save_pretrained(tmp_path / "b", candidates=3)  # the default Descent
    assert inference_config(tmp_path / "b") == (Descent(), 3)
    m.save_pretrained(tmp_path / "c", descent=cfg)  # one candidate
    assert inference_config(tmp_path / "c") == (cfg, 1)
    m.save_pretrained(tmp_path / "d")
    assert inference_config(tmp_path / "d") is None
    policy = EnergyPolicy(m, cfg, candidates=2, horizon=3, action_dim=1)
    policy.save_pretrained(tmp_path / "e")
    assert inference_config(tmp_path / "e") is None  # a policy's configuration is part of the policy


def test_inference_configuration_errors(tmp_path):
    from pyebm.pretrained import inference_config

    m = MLPEnergy(4, 3, hidden=(8,))
    with pytest.raises(ValueError, match="candidates must be an int >= 1 or None; got 0"):
        m.save_pretrained(tmp_path / "x", candidates=0)
    with pytest.raises(TypeError, match="descent must be a pyebm.Descent or None; got dict"):
        m.save_pretrained(tmp_path / "x", descent={"steps": 3})
    policy = EnergyPolicy(m, Descent(), candidates=2, horizon=3, action_dim=1)
    with pytest.raises(ValueError, match="EnergyPolicy saves its own Descent and candidates"):
        policy.save_pretrained(tmp_path / "x", candidates=4)
    assert not (tmp_path / "x").exists()
    m.save_pretrained(tmp_path, descent=Descent.gd(steps=2), candidates=2)
    edit_config(tmp_path, lambda c: c["inference"].update(candidates=True))
    with pytest.raises(ValueError, match="has candidates True; expected an int >= 1"):
        inference_config(tmp_path)
    edit_config(tmp_path, lambda c: c["inference"].update(candidates=2, descent={"steps": -1}))
    with pytest.raises(ValueError, match="holds an invalid descent"):
        inference_config(tmp_path)
    edit_config(tmp_path, lambda c: c.update(inference=[1, 2]))
    with pytest.raises(ValueError, match="must be an object with \"descent\" and \"candidates\""):
        inference_config(tmp_path)


# -- an EBT's think / generate defaults -------------------------------------------------------------------

def tiny_ebt():
    torch.manual_seed(0)
    return EBT(vocab_size=17, embedding_dim=8, num_transformer_blocks=1, multiheaded_attention_heads=2,
               context_length=8, mcmc_step_size=2.0, dtype=torch.float64)


def test_ebt_saved_with_its_think_and_generate_defaults(tmp_path):
    from pyebm.models import EBTInference
    from pyebm.pretrained import inference_config

    m = tiny_ebt()
    m.save_pretrained(tmp_path / "plain")  # the default: no entry, the directory of an older pyebm
    assert "inference" not in json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())
    assert EBT.from_pretrained(tmp_path / "plain").inference == EBTInference()
    cfg = EBTInference(steps=3, alpha=1.5, noise=0.1, samples=2, select="max_gap", accept_lower=True, init="zeros",
                       grad_clamp=4.0, temperature=0.7, top_p=0.8, eos_token_id=5)
    m.save_pretrained(tmp_path / "a", inference=cfg)
    entry = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["inference"]
    assert list(entry) == ["ebt"] and entry["ebt"]["version"] == 1 and entry["ebt"]["samples"] == 2
    loaded = from_pretrained(tmp_path / "a")
    assert loaded.inference == cfg and m.inference == EBTInference()  # saving does not change the model
    assert inference_config(tmp_path / "a") is None  # nothing for minimize
    tok = torch.tensor([[1, 2, 3], [4, 5, 6]])
    # the same weights through the same path: bit for bit
    assert torch.equal(loaded.generate(tok, 4, generator=0), m.generate(tok, 4, generator=0, **cfg.generate_kwargs()))
    # a model's own defaults are saved without inference=, next to a descent
    loaded.save_pretrained(tmp_path / "b", descent=Descent.ebt(steps=2), candidates=3)
    assert EBT.from_pretrained(tmp_path / "b").inference == cfg
    assert inference_config(tmp_path / "b") == (Descent.ebt(steps=2), 3)
    # an entry of an earlier version lacks options: they take their defaults
    edit_config(tmp_path / "b", lambda c: c["inference"].update(ebt={"version": 1, "samples": 4}))
    assert EBT.from_pretrained(tmp_path / "b").inference == EBTInference(samples=4)


def test_ebt_think_and_generate_defaults_errors(tmp_path):
    from pyebm.models import EBTInference
    from pyebm.pretrained import inference_config

    m = tiny_ebt()
    with pytest.raises(ValueError, match=r"eos_token_id=17 is not a token id of this model \(vocab_size=17\)"):
        m.save_pretrained(tmp_path / "x", inference=EBTInference(eos_token_id=17))
    with pytest.raises(TypeError, match="inference must be a pyebm.models.EBTInference or None; got dict"):
        m.save_pretrained(tmp_path / "x", inference={"samples": 2})
    with pytest.raises(ValueError, match="inference= .* is for an EBT; got a MLPEnergy"):
        MLPEnergy(4, 3).save_pretrained(tmp_path / "x", inference=EBTInference())
    assert not (tmp_path / "x").exists()
    m.save_pretrained(tmp_path, inference=EBTInference(samples=2))
    edit_config(tmp_path, lambda c: c["inference"]["ebt"].update(version=2))
    for read in (from_pretrained, inference_config):
        with pytest.raises(ValueError, match="version 2 was written by a newer pyebm; this one reads versions up to 1"):
            read(tmp_path)
    edit_config(tmp_path, lambda c: c["inference"].update(ebt={"version": 1, "samples": 0}))
    with pytest.raises(ValueError, match="\"ebt\"\\) is not valid: EBTInference: samples must be an int >= 1"):
        from_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c["inference"].update(ebt={"beams": 2}))
    with pytest.raises(ValueError, match=r"unknown options \['beams'\]"):
        EBT.from_pretrained(tmp_path)
    MLPEnergy(4, 3).save_pretrained(tmp_path / "mlp", candidates=2)
    edit_config(tmp_path / "mlp", lambda c: c["inference"].update(ebt={"samples": 2}))
    with pytest.raises(ValueError, match="holds think / generate defaults .* for a MLPEnergy; only an EBT"):
        from_pretrained(tmp_path / "mlp")


# -- devices ------------------------------------------------------------------------------------------

def test_device_argument_moves_the_weights(saved):
    loaded = MLPEnergy.from_pretrained(saved, device="cpu")
    assert loaded.device == torch.device("cpu")


@pytest.mark.gpu
def test_save_from_cuda_and_load_onto_cuda(tmp_path):
    torch.manual_seed(0)
    m = MLPEnergy(4, 3, hidden=(8, 8), device="cuda")
    x, y = torch.randn(2, 4, device="cuda"), torch.randn(2, 5, 3, device="cuda")
    want = m.energy_and_grad(m.prepare(x), y)
    m.save_pretrained(tmp_path)
    loaded = MLPEnergy.from_pretrained(tmp_path, device="cuda")
    assert loaded.device.type == "cuda"
    assert_equal(list(loaded.energy_and_grad(loaded.prepare(x), y)), list(want))
