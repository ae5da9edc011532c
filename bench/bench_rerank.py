"""Rerank of N proposals against an eager scoring loop; the assignment solver against scipy.

    python bench/bench_rerank.py [--quick] [--device cpu|cuda] [--N 64,256,1024,4096] [--B 4]
                                 [--k 8,32,128,256] [--assign-B 1,64,1024] [--only rerank|assign] [--sweep]
                                 [--json FILE] [--csv FILE] [--plot FILE] [--min-samples N] [--max-samples N]
                                 [--budget S]

Same code as `pyebm bench rerank` and `pyebm bench assign` (pyebm/bench/rerank_suite.py: the sizes, the
columns, and which large combinations are left out). --N/--B/--k/--assign-B replace the default sizes;
an assignment grid given with --k or --assign-B is run whole.
"""
import argparse
import sys

import torch

from pyebm.bench.core import BenchResult, machine_info
from pyebm.bench.rerank_suite import assign_cases, rerank_cases
from pyebm.bench.script import add_sampling_arguments, report, sampling_options


def _ints(ap: argparse.ArgumentParser, flag: str, text):
    if text is None:
        return None
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        ap.error(f"{flag}: comma-separated integers >= 1; got {text!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples, small sizes")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--N", default=None, help="proposals per context (rerank; default 64,256,1024,4096)")
    ap.add_argument("--B", type=int, default=None, help="contexts (rerank; default 4)")
    ap.add_argument("--k", default=None, help="assignment sizes (default 8,32,128,256)")
    ap.add_argument("--assign-B", default=None, help="assignment batch sizes (default 1,64,1024)")
    ap.add_argument("--only", choices=("rerank", "assign"), default=None)
    ap.add_argument("--sweep", action="store_true", help="rerank: also the batch sweep at N=256 (for --plot)")
    ap.add_argument("--no-memory", action="store_true", help="skip the allocation measurement")
    ap.add_argument("--json", default=None, help="write every sample, the statistics and the machine as JSON")
    ap.add_argument("--csv", default=None, help="write the table as CSV")
    ap.add_argument("--plot", default=None, help="PNG of latency against batch size and speed-up over eager")
    add_sampling_arguments(ap)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA device is available")
    if args.B is not None and args.B < 1:
        ap.error(f"--B must be >= 1; got {args.B}")
    Ns, ks, Bs = _ints(ap, "--N", args.N), _ints(ap, "--k", args.k), _ints(ap, "--assign-B", args.assign_B)
    common = dict(quick=args.quick, device=args.device, memory=not args.no_memory,
                  sampling=sampling_options(ap, args), progress=lambda m: print(f"measuring {m}", file=sys.stderr))
    cases = []
    if args.only in (None, "rerank"):
        cases += list(rerank_cases(Ns=Ns, B=args.B, sweep=args.sweep or bool(args.plot),
                                   **common))
    if args.only in (None, "assign"):
        cases += list(assign_cases(ks=ks, Bs=Bs, **common))
    return report("bench_rerank", BenchResult(cases, machine_info(args.device)), args)


if __name__ == "__main__":
    sys.exit(main())
