"""`pyebm bench ebt`: the EBT generation benchmark (pyebm/bench/ebt_bench.py) as suite cases."""
from __future__ import annotations

import argparse
from typing import Callable, Iterator, Optional

from pyebm.bench.core import Case, run_params
from pyebm.bench.suites import register_suite
from pyebm.bench.timing import Timing


def ebt_cases(quick: bool = False, device: str = "cpu", progress: Optional[Callable[[str], None]] = None,
              **_ignored) -> Iterator[Case]:
    if not device.startswith("cpu"):
        raise SystemExit("pyebm bench ebt: this suite runs on the CPU (the GPU path is the Triton kernel)")
    from pyebm.bench import ebt_bench

    p = argparse.ArgumentParser()
    ebt_bench.add_arguments(p)
    args = p.parse_args(["--quick"] if quick else [])
    if quick:
        args.layers, args.width, args.heads, args.vocab = 2, 64, 4, 512
        args.prompt, args.new_tokens, args.sweep = 32, 8, [16, 64, 256]
    else:
        args.sweep = [64, 256, 1024]
    if progress:
        progress("ebt generation (the reference runs once)")
    r = ebt_bench.run_bench(args)
    cfg = r["config"]
    params = run_params(dict(cfg), device)
    samples = r["samples_s"]
    note = "" if r["identical_greedy_output"] else "OUTPUTS DIFFER"
    size = f"{cfg['new_tokens']} tokens, prompt {cfg['prompt']}, G={cfg['samples']}"
    # Sequential timings (the reference generation runs once): intervals, where any, are not paired.
    sampling = {"interleaved": False, "rounds": None, "stop": "fixed repeats"}

    def case(size_, column, key, baseline=False, params_=params, note_=""):
        return Case("ebt", size_, column, Timing(list(samples[key])), baseline=baseline, params=params_, note=note_,
                    sampling=sampling)

    if r["reference_generate_s"] is not None:
        yield case(size, "reference algorithm: generate", "reference_generate_s", baseline=True)
    yield case(size, "pyebm: generate", "pyebm_generate_s", note_=note)
    step = "one think step (G samples)"
    if r["reference_step_s"] is not None:
        yield case(step, "reference algorithm", "reference_step_s", baseline=True)
    yield case(step, "pyebm", "pyebm_step_s")
    yield case("prefill", "pyebm", "pyebm_prefill_s")
    for S, _ in r["pyebm_step_by_prompt"]:
        yield case(f"think step, prompt {S}", "pyebm", f"pyebm_step_s prompt {S}", params_={**params, "prompt": S})


register_suite("ebt", ebt_cases)
