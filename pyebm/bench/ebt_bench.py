"""EBT generation: the reference algorithm against pyebm.models.EBT, at identical greedy outputs.

The reference (pyebm.reference.ebt) is the published algorithm: for every new token it recomputes the
whole prompt and every position for each descent step, and runs the G self-verification samples one
after another. pyebm caches the context keys/values once per prompt, extends them by one token per
generated token, and runs only the predicted position, for all G samples at once.

    python bench/bench_ebt.py            # (or pyebm bench ebt) 6 layers, width 384, 6 heads, vocab 8192, prompt 256, 32 tokens
    python bench/bench_ebt.py --quick    # a small model, a few seconds
    python bench/bench_ebt.py --quick --device cuda   # on a GPU, with the CUDA graph rows

Reported: generation throughput (prefill included), latency of one descent step (G samples) and how
the pyebm step grows with the prompt length. Medians; the reference generation runs once at full size.
With ``--device cuda`` also the per-token latency of ``generate`` and the latency of one ``think`` on a
cached prompt, eager against ``EBT(..., cuda_graph=True)`` (the think step replayed from a CUDA graph; the
capture happens in the warm-up call), with the check that both choose the same tokens.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from pyebm.models import EBT
from pyebm.reference import ebt as ref


def time_samples(fn: Callable[[], object], repeats: int, warmup: int = 1, sync: Optional[Callable[[], None]] = None
                 ) -> List[float]:
    """Seconds of ``repeats`` calls after ``warmup`` calls; ``sync`` (e.g. torch.cuda.synchronize) is called
    before each clock start and inside each timed interval, so a GPU's queued work is counted."""
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, into: Optional[List[float]] = None,
                sync: Optional[Callable[[], None]] = None) -> float:
    """Median of ``repeats`` timed calls; the samples are appended to ``into`` when given."""
    samples = time_samples(fn, repeats, warmup, sync)
    if into is not None:
        into.extend(samples)
    return statistics.median(samples)


def build(args) -> EBT:
    torch.manual_seed(args.seed)
    model = EBT(vocab_size=args.vocab, embedding_dim=args.width, num_transformer_blocks=args.layers,
                multiheaded_attention_heads=args.heads, context_length=max(args.prompt + args.new_tokens,
                                                                           max(args.sweep or [0])),
                ebt_type=args.ebt_type, mcmc_num_steps=2, mcmc_step_size=args.alpha)
    return model.eval().to(args.device)


def pyebm_step(model: EBT, cache, y: torch.Tensor, alpha: float) -> Callable[[], object]:
    """One descent step on the last position for all G samples (softmax, energy + gradient, update)."""
    pk = model._packed()
    S = cache.tokens.shape[1]
    rows = model._rows(pk, cache, torch.tensor([S - 1], device=y.device), y.shape[1])

    def step():
        p = torch.softmax(y, dim=-1)
        _, g = model._vocab_energy(pk, cache, 0, p, rows, True)
        return p - alpha * g

    return step


def reference_step(model: EBT, tokens: torch.Tensor, y: torch.Tensor, alpha: float) -> Callable[[], object]:
    """The same step as the reference takes it: one sample, every position of the sequence."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def step():
        p = torch.softmax(y, dim=-1)
        _, g = ref.energy_grad(params, model.config, tokens, p, 0)
        return p - alpha * g

    return step


def run_bench(args) -> Dict[str, object]:
    torch.set_num_threads(args.threads)
    # Subnormal floats (softmax over the vocabulary of spread-out logits) are 10-100x slower on a CPU.
    # pyebm zeroes subnormal probabilities itself; flushing them in hardware keeps the reference from
    # being slowed down by them too, so the comparison is about the algorithm.
    denormals_flushed = torch.set_flush_denormal(not args.keep_denormals) and not args.keep_denormals
    model = build(args)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    B, G, V = 1, args.samples, args.vocab
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, V, (B, args.prompt), generator=gen).to(dev)
    init = torch.randn(B, G, args.new_tokens, V, generator=gen).to(dev)
    opts = dict(steps=args.steps, alpha=args.alpha, select="min")
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = {}
    samples: Dict[str, List[float]] = {k: [] for k in ("pyebm_generate_s", "pyebm_prefill_s", "pyebm_step_s",
                                                       "reference_generate_s", "reference_step_s")}

    with torch.no_grad():
        t_fast = median_time(lambda: model.generate(tokens, args.new_tokens, samples=G, init=init, **opts),
                             repeats=args.repeats, into=samples["pyebm_generate_s"], sync=sync)
        fast_out = model.generate(tokens, args.new_tokens, samples=G, init=init, **opts)
        t_prefill = median_time(lambda: model.prepare(tokens, capacity=args.prompt + args.new_tokens), args.repeats,
                                into=samples["pyebm_prefill_s"], sync=sync)
        cache = model.prepare(tokens)
        y = torch.randn(B, G, V, generator=gen).to(dev)
        t_step_fast = median_time(pyebm_step(model, cache, y, args.alpha), repeats=max(5, args.repeats * 3),
                                  into=samples["pyebm_step_s"], sync=sync)
        graph = graph_rows(model, tokens, cache, init, y, G, args, opts, samples, sync) if dev.type == "cuda" else None
    rows["pyebm prefill (s)"] = (None, t_prefill)

    if args.skip_reference:
        same, t_ref, t_step_ref = None, None, None
    else:
        t0 = time.perf_counter()
        ref_out = ref.generate(params, model.config, tokens, args.new_tokens, init, **opts)
        t_ref = time.perf_counter() - t0  # once: it is the slow side
        samples["reference_generate_s"].append(t_ref)
        same = bool(torch.equal(ref_out, fast_out))
        y_full = torch.randn(B, args.prompt, V, generator=gen)
        one = []
        y_full = y_full.to(dev)
        t_step_ref = median_time(reference_step(model, tokens, y_full, args.alpha), repeats=3, into=one, sync=sync)
        t_step_ref *= G  # the reference runs the G samples one after another
        samples["reference_step_s"] += [G * t for t in one]

    n = args.new_tokens
    result = {
        "config": {k: getattr(args, k) for k in ("layers", "width", "heads", "vocab", "prompt", "new_tokens", "steps",
                                                  "samples", "ebt_type", "threads", "alpha", "device")},
        "denormals_flushed": denormals_flushed,
        "identical_greedy_output": same,
        "reference_generate_s": t_ref, "pyebm_generate_s": t_fast,
        "reference_tokens_per_s": None if t_ref is None else n / t_ref, "pyebm_tokens_per_s": n / t_fast,
        "reference_step_s": t_step_ref, "pyebm_step_s": t_step_fast, "pyebm_prefill_s": t_prefill,
        "cuda_graph": graph,
        "samples_s": samples,
    }

    sweep = []
    if args.sweep:
        with torch.no_grad():
            for S in args.sweep:
                toks = torch.randint(0, V, (B, S), generator=gen).to(dev)
                c = model.prepare(toks)
                samples[f"pyebm_step_s prompt {S}"] = []
                sweep.append((S, median_time(pyebm_step(model, c, y, args.alpha), repeats=max(5, args.repeats * 3),
                                             into=samples[f"pyebm_step_s prompt {S}"], sync=sync)))
    result["pyebm_step_by_prompt"] = sweep
    return result


def graph_rows(model: EBT, tokens, cache, init, y, G: int, args, opts, samples, sync) -> Dict[str, object]:
    """Eager against ``cuda_graph=True`` on the same GPU: generate per token (prefill included), and one think on
    a cached prompt (the copy of the cache into the graph's static buffers included). The first call of each
    graphed column captures (warm-up, not timed)."""
    graphed = copy.deepcopy(model)
    graphed.cuda_graph = True
    n = args.new_tokens
    think_init = y[:, :, None]  # [B, G, 1, V]
    columns = {
        "eager_generate_s": lambda: model.generate(tokens, n, samples=G, init=init, **opts),
        "graph_generate_s": lambda: graphed.generate(tokens, n, samples=G, init=init, **opts),
        "eager_think_s": lambda: model.think(cache, samples=G, init=think_init, **opts),
        "graph_think_s": lambda: graphed.think(cache, samples=G, init=think_init, **opts),
    }
    out: Dict[str, object] = {}
    for key, fn in columns.items():
        samples[f"cuda_graph {key}"] = []
        out[key] = median_time(fn, repeats=max(5, args.repeats * 3), into=samples[f"cuda_graph {key}"], sync=sync)
    out["eager_per_token_s"] = out["eager_generate_s"] / n
    out["graph_per_token_s"] = out["graph_generate_s"] / n
    out["identical_tokens"] = bool(torch.equal(columns["graph_generate_s"](), columns["eager_generate_s"]()))
    a, b = columns["graph_think_s"](), columns["eager_think_s"]()
    out["think_energy_max_abs_diff"] = float((a.energy - b.energy).abs().max())
    return out


def print_table(r: Dict[str, object]) -> None:
    c = r["config"]
    print(f"EBT {c['ebt_type']}: {c['layers']} layers, width {c['width']}, {c['heads']} heads, vocab {c['vocab']}, "
          f"prompt {c['prompt']}, {c['new_tokens']} new tokens, steps {c['steps']}, G {c['samples']}, "
          f"{c['threads']} threads, fp32, subnormals {'flushed' if r['denormals_flushed'] else 'kept'}")

    def fmt(x, unit):
        if x is None:
            return "-"
        return f"{x * 1e3:.2f} ms" if unit == "s" else f"{x:.2f}"

    lines = [("generation, tokens/s (prefill incl.)", r["reference_tokens_per_s"], r["pyebm_tokens_per_s"], "x", True),
             ("generation, total", r["reference_generate_s"], r["pyebm_generate_s"], "s", False),
             ("one descent step, G samples", r["reference_step_s"], r["pyebm_step_s"], "s", False),
             ("prefill (context cache)", None, r["pyebm_prefill_s"], "s", False)]
    print(f"{'':40s} {'reference':>14s} {'pyebm':>14s} {'pyebm speed-up':>15s}")
    for name, a, b, unit, higher_better in lines:
        ratio = "-" if a is None or b is None else (f"{b / a:.1f}x" if higher_better else f"{a / b:.1f}x")
        print(f"{name:40s} {fmt(a, unit):>14s} {fmt(b, unit):>14s} {ratio:>15s}")
    same = r["identical_greedy_output"]
    print(f"identical greedy outputs: {'not checked' if same is None else same}")
    if r["pyebm_step_by_prompt"]:
        print("pyebm descent step vs prompt length: " + ", ".join(f"S={S}: {t * 1e3:.2f} ms"
                                                                  for S, t in r["pyebm_step_by_prompt"]))
    g = r.get("cuda_graph")
    if g:
        print()
        print(f"{'pyebm on ' + c['device']:40s} {'eager':>14s} {'cuda_graph':>14s} {'graph speed-up':>15s}")
        for name, a, b in (("generation, per token (prefill incl.)", g["eager_per_token_s"], g["graph_per_token_s"]),
                           ("one think, cached prompt, G samples", g["eager_think_s"], g["graph_think_s"])):
            print(f"{name:40s} {fmt(a, 's'):>14s} {fmt(b, 's'):>14s} {a / b:>14.1f}x")
        print(f"cuda_graph: same greedy tokens as eager: {g['identical_tokens']}; think energies differ by at most "
              f"{g['think_energy_max_abs_diff']:.2e}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small model (seconds)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", dest="new_tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--alpha", type=float, default=1.0, help="step size (random weights have large gradients)")
    p.add_argument("--ebt-type", dest="ebt_type", default="default", choices=["default", "time_embed"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", type=int, nargs="*", default=None, help="prompt lengths for the step-latency sweep")
    p.add_argument("--skip-reference", dest="skip_reference", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-denormals", dest="keep_denormals", action="store_true",
                   help="do not flush subnormal floats (slows the reference down on CPUs)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: also eager against EBT(..., cuda_graph=True)")


def run(args) -> int:
    if args.quick:
        args.layers, args.width, args.heads, args.vocab = 2, 64, 4, 512
        args.prompt, args.new_tokens = 32, 8
        if args.sweep is None:
            args.sweep = [16, 64, 256]
    elif args.sweep is None:
        args.sweep = [64, 256, 1024]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_ebt: --device cuda but no CUDA device is available")
    r = run_bench(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_table(r)
    graph_ok = r["cuda_graph"] is None or r["cuda_graph"]["identical_tokens"]
    return 0 if r["identical_greedy_output"] in (True, None) and graph_ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
