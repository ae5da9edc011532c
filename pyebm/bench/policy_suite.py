"""`pyebm bench policy`: act() latency of an EBT-Policy controller, side by side, batch 1 (one robot).

Columns, same observation and thread count:
  reference loop      the original algorithm (pyebm.reference.ebt_policy.act): autograd every step, the
                      observation keys/values recomputed every step, ||g|| read on the host every step
  pyebm K=1           EnergyPolicy.ebt_policy (cached observation side, fused energy + input gradient);
                      its actions equal the reference's (the note gives the max abs difference). With
                      one candidate the final energies are computed when last_result.energy is read,
                      which the timed act() does not do (the reference computes no final energy either)
  pyebm K=1 autograd  the same with autograd on the candidate only (EBTPolicy(grad_mode="autograd"))
  pyebm K=32          32 candidates per observation, best of 32
  DDIM-8, DDPM-100    an eager noise-prediction transformer of the same depth and width (diffusion policy,
                      bench/diffusion_policy_baseline.py; present in a source checkout)
Two regimes: "20 steps" (the step cap: random weights never meet the stop test) and "2 steps" (the stop
test met at once, as a trained EBT-Policy does: one step, then the final step).
The columns of a regime are sampled together, round-robin (pyebm.bench.timing.measure_interleaved).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, Iterator, List, Optional

import torch

from pyebm.bench.core import GEMM_COLUMN, Case, Column, measure_cases
from pyebm.bench.suites import merge_sampling, register_suite
from pyebm.bench.timing import gemm_reference

POLICY_SIZES = {
    # action_dim, horizon, width, layers, heads, observation steps (one token each)
    "small": dict(action_dim=7, horizon=16, embed_dim=64, layers=2, heads=4, n_obs_steps=2),
    "full": dict(action_dim=7, horizon=16, embed_dim=256, layers=8, heads=4, n_obs_steps=2),
}
REGIMES = (("20 steps", 1e-3), ("2 steps", 1e9))


def ebt_policy_flops(size: dict, grad: bool = True) -> float:
    """2 x multiply-adds of one candidate's energy (and input gradient, about the same again)."""
    A, T, D, Ly, To = size["action_dim"], size["horizon"], size["embed_dim"], size["layers"], size["n_obs_steps"]
    linear = T * (A * D + D * D + Ly * 8 * D * D + D * D + D * A)
    attention = Ly * (2 * T * T * D + 2 * T * To * D)
    return 2.0 * (linear + attention) * (2 if grad else 1)


def _diffusion_module():
    """bench/diffusion_policy_baseline.py of the source tree, or None outside a checkout."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "bench", "diffusion_policy_baseline.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("pyebm_bench_diffusion_policy_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_model(size: dict, seed: int = 0, device: str = "cpu"):
    from pyebm.models import EBTPolicy

    torch.manual_seed(seed)
    model = EBTPolicy(size["action_dim"], horizon=size["horizon"], embed_dim=size["embed_dim"],
                      layers=size["layers"], heads=size["heads"], n_obs_steps=size["n_obs_steps"], device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def policy_cases(quick: bool = False, device: str = "cpu", compile: bool = True, memory: bool = True,
                 sizes: Optional[List[str]] = None, sweep: bool = False,
                 progress: Optional[Callable[[str], None]] = None,
                 sampling: Optional[Dict[str, object]] = None) -> Iterator[Case]:
    from pyebm.policies import EnergyPolicy
    from pyebm.reference import ebt_policy as ref

    # Calls of tens to hundreds of milliseconds: one call per sample, a longer budget per regime.
    kw: Dict[str, object] = {"warmup": 1, "min_samples": 5, "max_samples": 20, "budget_s": 8.0, "min_sample_s": 0.0} \
        if quick else {"warmup": 1, "min_samples": 7, "max_samples": 60, "budget_s": 40.0, "min_sample_s": 0.0}
    kw = merge_sampling(kw, sampling)
    dp = _diffusion_module()
    for name in sizes or (["small"] if quick else ["full"]):
        size = POLICY_SIZES[name]
        model = build_model(size, device=device)
        T, A, D, To = size["horizon"], size["action_dim"], size["embed_dim"], size["n_obs_steps"]
        torch.manual_seed(1)
        obs = torch.randn(1, To, D, device=device)
        init = torch.randn(1, T, A, device=device)
        params = dict(model.state_dict())
        step_flops = ebt_policy_flops(size)
        diffusion = []
        if dp is not None:
            torch.manual_seed(2)
            net = dp.NoisePredictionTransformer(A, T, D, To, embed_dim=D, layers=size["layers"],
                                                heads=size["heads"]).to(device).eval()
            for kind, steps in (("ddim", 8), ("ddpm", 100)):
                sampler = dp.DiffusionSampler(net, train_steps=100, steps=steps, kind=kind)
                diffusion.append(Column(f"{kind.upper()}-{steps}", lambda s=sampler: s.sample(obs, (1, T, A)),
                                        note=f"{steps} network passes"))
        for regime, min_grad in REGIMES:
            label = f"{name}, {regime}"
            shape = {**size, "batch": 1, "min_grad": min_grad}

            def reference(min_grad=min_grad):
                return ref.act(params, obs, init, num_heads=model.heads, n_obs_steps=To, n_action_steps=8,
                               min_grad=min_grad, normalize_mode="batch")

            ref_out, info = reference()
            cols = [Column("reference loop", reference, baseline=True, flops=step_flops * info["steps"],
                           note=f"{info['steps']} steps")]
            for mode, column in (("manual", "pyebm K=1"), ("autograd", "pyebm K=1 autograd")):
                model.grad_mode = mode
                pol = EnergyPolicy.ebt_policy(model, min_grad=min_grad, coupled=True)
                out = pol.act(obs, init=init)
                steps = int(pol.last_result.steps.max())
                diff = (out - ref_out).abs().max().item()
                # Each policy object keeps the grad mode it was built with; the model's is set per call.
                cols.append(Column(column, (lambda p=pol, m=mode: _act_in_mode(model, m, p, obs, init)),
                                   flops=step_flops * steps,
                                   note=f"{steps} steps, max abs diff vs reference {diff:.1e}"))
            model.grad_mode = "manual"
            pol = EnergyPolicy.ebt_policy(model, candidates=32, min_grad=min_grad)
            pol.act(obs, generator=0)
            steps = int(pol.last_result.steps.max())
            cols.append(Column("pyebm K=32", lambda p=pol: _act_in_mode(model, "manual", p, obs, None, generator=0),
                               flops=32 * step_flops * steps, note=f"{steps} steps, best of 32"))
            cols += diffusion
            gemm = gemm_reference(step_flops * info["steps"], size["horizon"], device=device)
            cols.append(Column(GEMM_COLUMN, gemm, flops=gemm.flops, note=f"{size['horizon']} rows", alloc=False))
            yield from measure_cases("policy", label, cols, shape, device=device, timing=kw, progress=progress)


def _act_in_mode(model, mode: str, pol, obs, init, generator=None):
    model.grad_mode = mode
    if init is not None:
        return pol.act(obs, init=init)
    return pol.act(obs, generator=generator)


register_suite("policy", policy_cases)
