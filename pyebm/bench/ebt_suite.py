"""`pyebm bench ebt`: the EBT generation benchmark (pyebm/bench/ebt_bench.py) as suite cases."""
from __future__ import annotations

import argparse
from typing import Callable, Iterator, Optional

from pyebm.bench.core import Case
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
    params = dict(cfg)
    note = "" if r["identical_greedy_output"] else "OUTPUTS DIFFER"
    size = f"{cfg['new_tokens']} tokens, prompt {cfg['prompt']}, G={cfg['samples']}"
    if r["reference_generate_s"] is not None:
        yield Case("ebt", size, "reference algorithm: generate", Timing([r["reference_generate_s"]]), baseline=True,
                   params=params)
    yield Case("ebt", size, "pyebm: generate", Timing([r["pyebm_generate_s"]]), params=params, note=note)
    step = "one think step (G samples)"
    if r["reference_step_s"] is not None:
        yield Case("ebt", step, "reference algorithm", Timing([r["reference_step_s"]]), baseline=True, params=params)
    yield Case("ebt", step, "pyebm", Timing([r["pyebm_step_s"]]), params=params)
    yield Case("ebt", "prefill", "pyebm", Timing([r["pyebm_prefill_s"]]), params=params)
    for S, t in r["pyebm_step_by_prompt"]:
        yield Case("ebt", f"think step, prompt {S}", "pyebm", Timing([t]), params={**params, "prompt": S})


register_suite("ebt", ebt_cases)
