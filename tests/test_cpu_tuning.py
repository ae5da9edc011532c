"""The CPU kernels' row blocks: sized from this CPU's caches at run time, a whole number of blocks per thread,
overridable from the environment, and the results independent of how the rows are blocked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pyebm

pytestmark = pytest.mark.skipif(not pyebm.backends()["cpu"], reason="extension pyebm._C not built")

KIB = 1024


def _C():
    from pyebm import _C
    return _C


def _sysfs_caches():
    """{level: (bytes, cpus sharing)} for cpu0's data and unified caches, read independently of the extension."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    out = {}
    for d in sorted(root.glob("index*")):
        try:
            level = int((d / "level").read_text())
            kind = (d / "type").read_text().strip()
            size = (d / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction":
            continue
        unit = {"K": KIB, "M": KIB * KIB, "G": KIB ** 3}.get(size[-1:].upper(), 1)
        n = int(size.rstrip("KkMmGg")) * unit
        shared = 1
        try:
            text = (d / "shared_cpu_list").read_text().strip()
            shared = sum(int(b) - int(a) + 1 for a, _, b in (p.partition("-") if "-" in p else (p, "", p)
                                                             for p in text.split(",")))
        except (OSError, ValueError):
            pass
        out[level] = (n, shared)
    return out


def test_caches_are_read_from_this_cpu():
    t = _C().cpu_tuning()
    caches = _sysfs_caches()
    if 2 not in caches:
        assert t["cache_source"] in ("sysconf", "default")
        assert t["l2_bytes"] > 0 and t["l1d_bytes"] > 0
        return
    assert t["cache_source"] == "sysfs"
    assert (t["l2_bytes"], t["l2_shared_by"]) == caches[2]
    if 1 in caches:
        assert t["l1d_bytes"] == caches[1][0]
    if 3 in caches:
        assert (t["l3_bytes"], t["l3_shared_by"]) == caches[3]


def test_default_block_is_three_quarters_of_the_l2_share():
    t = _C().cpu_tuning()
    share = t["l2_bytes"] // t["l2_shared_by"]
    assert t["default_block_bytes"] == max(128 * KIB, min(4 * KIB * KIB, share // 4 * 3))
    if "PYEBM_CPU_BLOCK_BYTES" not in os.environ:
        assert t["block_bytes"] == t["default_block_bytes"]
    assert t["threads"] == torch.get_num_threads()


def _in_subprocess(env_extra, code):
    env = {**os.environ, **env_extra}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_environment_overrides_the_cache_rule():
    code = "import json, pyebm; from pyebm import _C; print(json.dumps(_C.cpu_tuning()))"
    t = _in_subprocess({"PYEBM_CPU_BLOCK_BYTES": "123456", "PYEBM_CPU_SPLIT_FLOPS": "4321"}, code)
    assert t["block_bytes"] == 123456 and t["split_flops"] == 4321
    # not a positive number: the default, as before
    t = _in_subprocess({"PYEBM_CPU_BLOCK_BYTES": "0", "PYEBM_CPU_SPLIT_FLOPS": "-5"}, code)
    assert t["block_bytes"] == t["default_block_bytes"] and t["split_flops"] == 300000


def _rule(N, row_bytes, flops, threads, budget, split):
    """The rule written out: the cache budget's blocks, or enough for the threads where each still pays for
    the fork, rounded up to a whole number per thread."""
    fit = max(16, min(512, budget // max(1, row_bytes)))
    fit_blocks = -(-N // fit)
    fork_blocks = max(1, N // max(8, split // max(1, flops)))
    want = max(fit_blocks, min(max(1, threads), fork_blocks))
    t = max(1, min(threads, want))
    nblocks = min(N, -(-want // t) * t)
    return fit, max(8, split // max(1, flops)), -(-N // nblocks)


def _thread_rows(N, M, threads):
    """Rows each thread gets when ceil(N / M) blocks are split into equal contiguous chunks (OpenMP static,
    as at::parallel_for does with grain 1)."""
    nb = -(-N // M)
    per = -(-nb // min(threads, nb))
    sizes = [min(M, N - b * M) for b in range(nb)]
    return [sum(sizes[i:i + per]) for i in range(0, nb, per)]


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 8, 16])
def test_block_rows_rule(threads):
    C = _C()
    cases = 0
    for N in list(range(1, 200)) + [255, 256, 257, 1000, 1023, 1024, 4095, 4096, 4097, 65536, 100003]:
        for row_bytes in (64, 1000, 7000, 30000, 300000):
            for flops in (1, 5000, 100000, 10 ** 7):
                for budget, split in ((768 * KIB, 300000), (256 * KIB, 300000), (2 * KIB * KIB, 10 ** 6)):
                    M = C.cpu_block_rows(N, row_bytes, flops, threads, budget, split)
                    fit, min_rows, want_M = _rule(N, row_bytes, flops, threads, budget, split)
                    assert M == want_M, (N, row_bytes, flops, threads, budget, split)
                    assert 1 <= M <= min(N, fit)              # a block never outgrows the cache budget
                    nb = -(-N // M)
                    if threads == 1:
                        assert nb == -(-N // fit)             # one thread: the budget alone decides
                    elif -(-N // fit) == 1 and nb > 1:
                        assert M >= min_rows                  # a split made only for threads pays for the fork
                    rows = _thread_rows(N, M, threads)
                    # balance: no thread does more than an even share plus one block
                    assert max(rows) <= -(-N // len(rows)) + M
                    cases += 1
    assert cases > 5000


def test_results_do_not_depend_on_the_blocking():
    """Energy, gradient and the whole descent loop under tiny blocks and four threads equal the defaults'
    (rows are independent; only the order of a row's own sums may differ with the block's row count)."""
    code = r"""
import json, torch, pyebm
torch.manual_seed(0)
torch.set_num_threads(int(__import__('os').environ['NT']))
m = pyebm.MLPEnergy(12, 10, hidden=(48, 40, 32), activation="silu").double()
x = torch.randn(5, 12, dtype=torch.float64)
y = torch.randn(5, 37, 10, dtype=torch.float64)
E, G = m.energy_and_grad(m.prepare(x), y)
r = pyebm.minimize(m, x, candidates=37, init=y, config=pyebm.Descent.gd(steps=6, step_size=0.05), backend="cpu",
                   whole_loop=True)
print(json.dumps({"E": E.flatten().tolist(), "G": G.flatten().tolist(), "y": r.y.flatten().tolist(),
                  "e": r.energy.flatten().tolist()}))
"""
    base = _in_subprocess({"NT": "1"}, code)
    for extra in ({"NT": "4", "PYEBM_CPU_BLOCK_BYTES": "2048"}, {"NT": "3", "PYEBM_CPU_SPLIT_FLOPS": "1"},
                  {"NT": "2", "PYEBM_CPU_BLOCK_BYTES": str(64 * KIB * KIB)}):
        got = _in_subprocess(extra, code)
        for k in base:
            torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(base[k]), rtol=1e-12, atol=1e-12,
                                       msg=lambda m, k=k, e=extra: f"{k} under {e}: {m}")
