"""PYEBM_CPU_ISA: the instruction set of the CPU kernels, forced at import.

`make test` runs the CPU kernel tests once more under each instruction set the machine supports below its
widest (`make test-isa`); these tests check the switch itself: what is reported, that a forced level computes
the same values (to rounding) as the default one, and that an unknown or unsupported request is an error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import pyebm

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"] and "PYEBM_CPU_ISA" not in os.environ,
                                reason="extension pyebm._C not built")

ISAS = ("avx512", "avx2", "baseline")


def _info():
    from pyebm import _C

    return _C.cpu_isa()


def _run(code: str, isa):
    env = dict(os.environ)
    env.pop("PYEBM_CPU_ISA", None)
    if isa is not None:
        env["PYEBM_CPU_ISA"] = isa
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_requested_level_loads():
    """Under PYEBM_CPU_ISA (make test-isa) the kernels must be there: a run whose extension refused to load
    would skip every kernel test and prove nothing."""
    assert pyebm.backends()["cpu"], pyebm.backends().why["cpu"]


def test_reported_level_is_the_requested_one():
    info = _info()
    assert info["supported"][-1] == "baseline" and info["supported"][0] in ISAS
    assert list(info["supported"]) == [i for i in ISAS if i in info["supported"]]      # widest first
    requested = os.environ.get("PYEBM_CPU_ISA")
    if requested in (None, "", "auto"):
        assert info["active"] == info["supported"][0] and info["requested"] in (None, "", "auto")
    else:
        assert info["active"] == requested.strip().lower() and info["requested"] == requested
    assert pyebm._backend.ext_info()["cpu_isa"] == info["active"]


_KERNELS = """
import json, torch, pyebm
from pyebm import _C
from pyebm.ops import ebt_policy as eop
from pyebm.models import EBTPolicy
torch.manual_seed(0)
out = {"isa": _C.cpu_isa()["active"]}
m = pyebm.MLPEnergy(6, 5, hidden=(64, 48), activation="silu")
ctx = m.prepare(torch.randn(3, 6)).detach()
y = torch.randn(3, 37, 5)
with torch.no_grad():
    E, G = torch.ops.pyebm.mlp_energy_grad(ctx, y, *[t.detach() if isinstance(t, torch.Tensor) else [u.detach() for u in t]
                                                     for t in m.op_params()], "silu", False)
out["mlp"] = [E.tolist(), G.tolist()]
p = EBTPolicy(3, horizon=4, embed_dim=16, layers=1, heads=2, n_obs_steps=2, cond_dim=8)
obs = torch.randn(2, 2, 8)
with torch.no_grad():
    c = p.prepare(obs)
    E2, G2 = torch.ops.pyebm.ebt_policy_energy_grad(torch.randn(2, 3, 4, 3), c.k, c.v, c.bias, eop.param_list(p), [],
                                                    2, 1e-6, 1e-5, True)
out["policy"] = [E2.tolist(), G2.tolist()]
print(json.dumps(out))
"""


def test_forced_levels_compute_the_same_values():
    """Every level this CPU runs gives the default level's values, to float32 rounding (other vector widths
    sum in other orders, so not bit for bit)."""
    runs = {}
    for isa in [None] + list(_info()["supported"]):
        r = _run(_KERNELS, isa)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[isa] = json.loads(r.stdout.strip().splitlines()[-1])
        assert runs[isa]["isa"] == (isa or _info()["supported"][0])
    base = runs[None]
    for isa, got in runs.items():
        for key in ("mlp", "policy"):
            for a, b in zip(got[key], base[key]):
                torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=2e-5, atol=2e-6,
                                           msg=f"{key} under PYEBM_CPU_ISA={isa}")


@pytest.mark.parametrize("value,match", [("avx3", "must be one of avx512, avx2, baseline, auto"),
                                         ("sse", "must be one of avx512, avx2, baseline, auto")])
def test_unknown_level_is_an_error(value, match):
    r = _run("import pyebm", value)
    assert r.returncode != 0 and "ValueError" in r.stderr and match in r.stderr, r.stderr[-2000:]


def test_level_above_the_cpu_is_an_error():
    supported = _info()["supported"]
    above = [i for i in ISAS if i not in supported]
    if not above:
        pytest.skip("this CPU runs every level")
    r = _run("import pyebm", above[-1])
    assert r.returncode != 0 and "does not support" in r.stderr, r.stderr[-2000:]


def test_case_and_auto_are_accepted():
    r = _run("from pyebm import _C; print(_C.cpu_isa()['active'])", " Baseline ")
    assert r.returncode == 0 and r.stdout.strip() == "baseline", r.stderr[-2000:]
    r = _run("from pyebm import _C; print(_C.cpu_isa()['active'])", "auto")
    assert r.returncode == 0 and r.stdout.strip() == _info()["supported"][0], r.stderr[-2000:]
