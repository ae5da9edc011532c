"""The generation row of bench_ebt.py alone: pyebm's EBT.generate (median of 3 after a warm-up) and the
reference algorithm's generate (once), in one process, same model, inputs and options as bench_ebt.py.

    python bench/bench_ebt_generate.py {default,time_embed} NEW_TOKENS [skip]   # skip: no reference

6 layers, width 384, 6 heads, vocabulary 8192, prompt 256, G = 4, 2 steps, alpha 1, 2 threads, subnormals
flushed. Prints one JSON line: the kernels' instruction set, pyebm's median and samples (ms), the reference
time (s), the ratio and whether the greedy tokens are identical. A quick check between full bench runs on a
shared host (a run takes the reference's time plus a second).
"""
import json
import sys
import time

import torch

from pyebm import _C
from pyebm.models import EBT
from pyebm.reference import ebt as ref


def main(argv) -> int:
    typ, n, skip_ref = argv[0], int(argv[1]), len(argv) > 2
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    m = EBT(vocab_size=8192, embedding_dim=384, num_transformer_blocks=6, multiheaded_attention_heads=6,
            context_length=256 + n, ebt_type=typ, mcmc_num_steps=2, mcmc_step_size=1.0).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 8192, (1, 256), generator=g)
    init = torch.randn(1, 4, n, 8192, generator=g)
    opts = dict(steps=2, alpha=1.0, select="min")
    with torch.no_grad():
        out = m.generate(tokens, n, samples=4, init=init, **opts)
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            m.generate(tokens, n, samples=4, init=init, **opts)
            ts.append(time.perf_counter() - t0)
        fast = sorted(ts)[1]
        r, same = None, None
        if not skip_ref:
            params = {k: v.detach() for k, v in m.named_parameters()}
            t0 = time.perf_counter()
            want = ref.generate(params, m.config, tokens, n, init, **opts)
            r = time.perf_counter() - t0
            same = bool(torch.equal(out, want))
    print(json.dumps({"isa": _C.cpu_isa()["active"], "torch_cap": torch.backends.cpu.get_cpu_capability(),
                      "case": f"{typ}-{n}", "pyebm_ms": fast * 1e3, "samples_ms": [t * 1e3 for t in ts], "ref_s": r,
                      "x": None if r is None else r / fast, "same": same}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
