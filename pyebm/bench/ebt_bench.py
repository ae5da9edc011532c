"""EBT generation: the reference algorithm against pyebm.models.EBT, at identical greedy outputs.

The reference (pyebm.reference.ebt) is the published algorithm: for every new token it recomputes the
whole prompt and every position for each descent step, and runs the G self-verification samples one
after another. pyebm caches the context keys/values once per prompt, extends them by one token per
generated token, and runs only the predicted position, for all G samples at once.

    python bench/bench_ebt.py            # (or pyebm bench ebt) 6 layers, width 384, 6 heads, vocab 8192, prompt 256, 32 tokens
    python bench/bench_ebt.py --quick    # a small model, a few seconds

Reported: generation throughput (prefill included), latency of one descent step (G samples) and how
the pyebm step grows with the prompt length. Medians; the reference generation runs once at full size.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

from pyebm.models import EBT
from pyebm.reference import ebt as ref


def time_samples(fn: Callable[[], object], repeats: int, warmup: int = 1) -> List[float]:
    for _ in range(warmup):
        fn()
    samples: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1, into: Optional[List[float]] = None) -> float:
    """Median of ``repeats`` timed calls; the samples are appended to ``into`` when given."""
    samples = time_samples(fn, repeats, warmup)
    if into is not None:
        into.extend(samples)
    return statistics.median(samples)


def build(args) -> EBT:
    torch.manual_seed(args.seed)
    model = EBT(vocab_size=args.vocab, embedding_dim=args.width, num_transformer_blocks=args.layers,
                multiheaded_attention_heads=args.heads, context_length=max(args.prompt + args.new_tokens,
                                                                           max(args.sweep or [0])),
                ebt_type=args.ebt_type, mcmc_num_steps=2, mcmc_step_size=args.alpha)
    return model.eval()


def pyebm_step(model: EBT, cache, y: torch.Tensor, alpha: float) -> Callable[[], object]:
    """One descent step on the last position for all G samples (softmax, energy + gradient, update)."""
    pk = model._packed()
    S = cache.tokens.shape[1]
    rows = model._rows(pk, cache, torch.tensor([S - 1]), y.shape[1])

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
    B, G, V = 1, args.samples, args.vocab
    gen = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, V, (B, args.prompt), generator=gen)
    init = torch.randn(B, G, args.new_tokens, V, generator=gen)
    opts = dict(steps=args.steps, alpha=args.alpha, select="min")
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = {}
    samples: Dict[str, List[float]] = {k: [] for k in ("pyebm_generate_s", "pyebm_prefill_s", "pyebm_step_s",
                                                       "reference_generate_s", "reference_step_s")}

    with torch.no_grad():
        t_fast = median_time(lambda: model.generate(tokens, args.new_tokens, samples=G, init=init, **opts),
                             repeats=args.repeats, into=samples["pyebm_generate_s"])
        fast_out = model.generate(tokens, args.new_tokens, samples=G, init=init, **opts)
        t_prefill = median_time(lambda: model.prepare(tokens, capacity=args.prompt + args.new_tokens), args.repeats,
                                into=samples["pyebm_prefill_s"])
        cache = model.prepare(tokens)
        y = torch.randn(B, G, V, generator=gen)
        t_step_fast = median_time(pyebm_step(model, cache, y, args.alpha), repeats=max(5, args.repeats * 3),
                                  into=samples["pyebm_step_s"])
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
        t_step_ref = median_time(reference_step(model, tokens, y_full, args.alpha), repeats=3, into=one)
        t_step_ref *= G  # the reference runs the G samples one after another
        samples["reference_step_s"] += [G * t for t in one]

    n = args.new_tokens
    result = {
        "config": {k: getattr(args, k) for k in ("layers", "width", "heads", "vocab", "prompt", "new_tokens", "steps",
                                                  "samples", "ebt_type", "threads", "alpha")},
        "denormals_flushed": denormals_flushed,
        "identical_greedy_output": same,
        "reference_generate_s": t_ref, "pyebm_generate_s": t_fast,
        "reference_tokens_per_s": None if t_ref is None else n / t_ref, "pyebm_tokens_per_s": n / t_fast,
        "reference_step_s": t_step_ref, "pyebm_step_s": t_step_fast, "pyebm_prefill_s": t_prefill,
        "samples_s": samples,
    }

    sweep = []
    if args.sweep:
        with torch.no_grad():
            for S in args.sweep:
                toks = torch.randint(0, V, (B, S), generator=gen)
                c = model.prepare(toks)
                samples[f"pyebm_step_s prompt {S}"] = []
                sweep.append((S, median_time(pyebm_step(model, c, y, args.alpha), repeats=max(5, args.repeats * 3),
                                             into=samples[f"pyebm_step_s prompt {S}"])))
    result["pyebm_step_by_prompt"] = sweep
    return result


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


def run(args) -> int:
    if args.quick:
        args.layers, args.width, args.heads, args.vocab = 2, 64, 4, 512
        args.prompt, args.new_tokens = 32, 8
        if args.sweep is None:
            args.sweep = [16, 64, 256]
    elif args.sweep is None:
        args.sweep = [64, 256, 1024]
    r = run_bench(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_table(r)
    return 0 if r["identical_greedy_output"] in (True, None) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
