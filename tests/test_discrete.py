"""pyebm.discrete argmins against brute force over every set / permutation of small problems, Sinkhorn
against a plain (non-log) Sinkhorn, and bad input."""
import itertools

import pytest
import torch

from pyebm.discrete import permutation_argmin, permutation_energy, set_argmin, set_energy, sinkhorn

scipy = pytest.importorskip("scipy")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread


def all_sets(L, dtype=torch.float64):
    return torch.tensor(list(itertools.product([0, 1], repeat=L)), dtype=dtype)  # [2^L, L]


def brute_set_energies(u, U=None):
    """E of every set [B, 2^L], written out directly."""
    Y = all_sets(u.shape[-1], u.dtype)
    E = -(u.unsqueeze(1) * Y).sum(-1)
    if U is not None:
        E = E - 0.5 * torch.einsum("sl,blm,sm->bs", Y, U, Y)
    return E, Y


# -- sets --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 3, 7])
def test_unary_argmin_is_the_brute_force_minimum(L):
    u = torch.randn(5, L, dtype=torch.float64)
    res = set_argmin(u)
    E, Y = brute_set_energies(u)
    assert res.exact and res.flips is None
    torch.testing.assert_close(res.energy, E.min(1).values)
    torch.testing.assert_close(res.energy, set_energy(res.y, u))
    assert ((res.y == 0) | (res.y == 1)).all()


@pytest.mark.parametrize("at_most", [False, True])
def test_unary_cardinality_is_the_brute_force_minimum(at_most):
    L = 6
    u = torch.randn(8, L, dtype=torch.float64)
    E, Y = brute_set_energies(u)
    size = Y.sum(1)
    for k in range(L + 1):
        res = set_argmin(u, k=k, at_most=at_most)
        allowed = (size <= k) if at_most else (size == k)
        best = E.masked_fill(~allowed, float("inf")).min(1).values
        torch.testing.assert_close(res.energy, best)
        n = res.y.sum(1)
        assert ((n <= k) if at_most else (n == k)).all()


def test_unary_ties():
    u = torch.tensor([[1.0, 0.0, 1.0, -1.0, 0.0]])
    assert set_argmin(u).y.tolist() == [[1, 0, 1, 0, 0]]           # zero scores stay out
    assert set_argmin(u, k=3).y.tolist() == [[1, 1, 1, 0, 0]]      # equal scores: lower index first
    assert set_argmin(u, k=3, at_most=True).y.tolist() == [[1, 0, 1, 0, 0]]
    one = set_argmin(torch.tensor([0.5, -0.5]))
    assert one.y.tolist() == [1.0, 0.0] and one.energy.dim() == 0


def test_pairwise_result_is_one_flip_optimal_and_no_better_than_brute_force():
    torch.manual_seed(0)
    B, L = 32, 8
    u = torch.randn(B, L, dtype=torch.float64)
    U = torch.randn(B, L, L, dtype=torch.float64)
    res = set_argmin(u, U)
    E, Y = brute_set_energies(u, U)
    assert not res.exact
    torch.testing.assert_close(res.energy, set_energy(res.y, u, U))
    assert (res.energy >= E.min(1).values - 1e-12).all()
    # every single flip of the result raises (or keeps) the energy
    for i in range(L):
        flipped = res.y.clone()
        flipped[:, i] = 1 - flipped[:, i]
        assert (set_energy(flipped, u, U) >= res.energy - 1e-12).all()
    # a local method: it finds the global minimum on most of these small random problems
    found = torch.isclose(res.energy, E.min(1).values).double().mean()
    assert found >= 0.6, float(found)


def test_pairwise_ferromagnetic_and_zero_coupling_are_exact():
    torch.manual_seed(1)
    B, L = 16, 7
    u = torch.randn(B, L, dtype=torch.float64)
    zero = set_argmin(u, torch.zeros(L, L, dtype=torch.float64))
    assert torch.equal(zero.y, set_argmin(u).y)
    # strong positive couplings: the all-ones or the all-zeros set, whichever is lower
    U = torch.full((L, L), 5.0, dtype=torch.float64)
    res = set_argmin(u, U)
    E, _ = brute_set_energies(u, U.expand(B, L, L))
    torch.testing.assert_close(res.energy, E.min(1).values)


def test_pairwise_local_search_from_init():
    torch.manual_seed(2)
    L = 6
    u = torch.randn(4, L, dtype=torch.float64)
    U = torch.randn(L, L, dtype=torch.float64)
    init = torch.randint(0, 2, (4, L)).bool()
    res = set_argmin(u, U, init=init)
    assert (res.energy <= set_energy(init, u, U) + 1e-12).all()
    assert (res.flips >= 0).all()
    unchanged = res.flips == 0
    assert torch.equal(res.y[unchanged], init[unchanged].double())


# -- pairwise sets with a cardinality constraint -----------------------------------------------------

def feasible(Y, k, at_most):
    n = Y.sum(-1)
    return (n <= k) if at_most else (n == k)


def brute_energy_of(y, u, U):
    """E of given sets y [..., B, L] written out with einsum (no shared code with pyebm)."""
    return -(u * y).sum(-1) - 0.5 * torch.einsum("...bl,blm,...bm->...b", y, U, y)


def neighbours(y, k, at_most):
    """Every feasible set one move away from each y [B, L], enumerated label by label: [M, B, L] and whether
    each is a real move of that problem [M, B]. Exactly k: swaps (one label in, one out); at most k: also
    single additions (below k labels) and single removals."""
    B, L = y.shape
    out, valid = [], []
    for i in range(L):
        for j in range(L):
            z = y.clone()
            z[:, i], z[:, j] = 1.0, 0.0
            out.append(z)
            valid.append((y[:, i] == 0) & (y[:, j] == 1))
    if at_most:
        for i in range(L):
            z = y.clone()
            z[:, i] = 1.0
            out.append(z)
            valid.append((y[:, i] == 0) & (y.sum(1) < k))
            z = y.clone()
            z[:, i] = 0.0
            out.append(z)
            valid.append(y[:, i] == 1)
    return torch.stack(out), torch.stack(valid)


def check_move_optimal(res, u, U, k, at_most, slack=1e-10):
    Y, valid = neighbours(res.y, k, at_most)
    assert feasible(Y, k, at_most)[valid].all()
    E = brute_energy_of(Y.to(u.dtype), u, U)                                # [M, B]
    lower = valid & (E < res.energy.to(u.dtype) - slack)
    assert not lower.any(), f"a feasible move lowers E in problems {lower.any(0).nonzero().flatten().tolist()}"


@pytest.mark.parametrize("at_most", [False, True])
@pytest.mark.parametrize("L", [1, 5, 9])
def test_pairwise_cardinality_is_feasible_move_optimal_and_no_better_than_brute_force(L, at_most):
    torch.manual_seed(10 + L)
    B = 24
    u = torch.randn(B, L, dtype=torch.float64)
    U = torch.randn(B, L, L, dtype=torch.float64)
    E, Y = brute_set_energies(u, U)
    found = []
    for k in range(L + 1):
        res = set_argmin(u, U, k=k, at_most=at_most, max_rounds=1000)   # a cap: a cycling search fails here
        assert (res.flips < 1000).all()
        assert not res.exact and res.flips.dtype == torch.int64 and (res.flips >= 0).all()
        assert ((res.y == 0) | (res.y == 1)).all()
        assert feasible(res.y, k, at_most).all()
        torch.testing.assert_close(res.energy, brute_energy_of(res.y, u, U))
        torch.testing.assert_close(res.energy, set_energy(res.y, u, U))
        best = E.masked_fill(~feasible(Y, k, at_most), float("inf")).min(1).values
        assert (res.energy >= best - 1e-12).all()
        check_move_optimal(res, u, U, k, at_most)
        found.append(torch.isclose(res.energy, best))
    # a local method: it finds the constrained global minimum on most of these small random problems
    rate = torch.cat(found).double().mean()
    assert rate >= 0.85, float(rate)


@pytest.mark.parametrize("at_most", [False, True])
def test_pairwise_cardinality_easy_problems_are_solved_exactly(at_most):
    """Linear energies (U = 0, or a diagonal U: y_i^2 = y_i makes it unary) have no swap-optimal set
    (with additions and removals for at most k) other than the global minima: the search must find them."""
    torch.manual_seed(3)
    B, L = 16, 8
    u = torch.randn(B, L, dtype=torch.float64)
    E0, Y = brute_set_energies(u)
    d = torch.randn(L, dtype=torch.float64)
    Ed, _ = brute_set_energies(u, torch.diag(d).expand(B, L, L))
    for k in range(L + 1):
        allowed = feasible(Y, k, at_most)
        zero = set_argmin(u, torch.zeros(L, L, dtype=torch.float64), k=k, at_most=at_most)
        torch.testing.assert_close(zero.energy, E0.masked_fill(~allowed, float("inf")).min(1).values)
        torch.testing.assert_close(zero.energy, set_argmin(u, k=k, at_most=at_most).energy)
        # with U = 0 the relaxation is linear: it ends at the top-k vertex, and the rounding (top k; at most
        # k: the best prefix, here the positive scores among the top k) is already the exact answer
        rounded = set_argmin(u, torch.zeros(L, L, dtype=torch.float64), k=k, at_most=at_most, max_rounds=0)
        assert torch.equal(rounded.y, set_argmin(u, k=k, at_most=at_most).y)
        diag = set_argmin(u, torch.diag(d), k=k, at_most=at_most)
        torch.testing.assert_close(diag.energy, Ed.masked_fill(~allowed, float("inf")).min(1).values)
    # not guaranteed, but it holds here: a weak coupling next to a dominant diagonal
    U = torch.diag(4 * torch.randn(L, dtype=torch.float64)) + 0.01 * torch.randn(L, L, dtype=torch.float64)
    E, _ = brute_set_energies(u, U.expand(B, L, L))
    for k in range(L + 1):
        res = set_argmin(u, U, k=k, at_most=at_most)
        torch.testing.assert_close(res.energy, E.masked_fill(~feasible(Y, k, at_most), float("inf")).min(1).values)


@pytest.mark.parametrize("at_most", [False, True])
def test_pairwise_cardinality_unbatched_and_shared_coupling(at_most):
    torch.manual_seed(4)
    B, L, k = 6, 7, 3
    u = torch.randn(B, L, dtype=torch.float64)
    U = torch.randn(L, L, dtype=torch.float64)
    shared = set_argmin(u, U, k=k, at_most=at_most)
    per = set_argmin(u, U.expand(B, L, L).clone(), k=k, at_most=at_most)
    # the same symmetrised couplings, the same batched arithmetic: the same sets
    assert torch.equal(shared.y, per.y) and torch.equal(shared.flips, per.flips)
    check_move_optimal(shared, u, U.expand(B, L, L), k, at_most)
    for b in range(B):
        one = set_argmin(u[b], U, k=k, at_most=at_most)
        assert one.y.shape == (L,) and one.energy.dim() == 0 and one.flips.dim() == 0
        torch.testing.assert_close(one.energy, set_energy(one.y, u[b], U))
        assert int(one.y.sum()) <= k if at_most else int(one.y.sum()) == k
        torch.testing.assert_close(one.energy, shared.energy[b])


def test_pairwise_cardinality_float32():
    torch.manual_seed(5)
    B, L, k = 12, 9, 4
    u = torch.randn(B, L)
    U = torch.randn(B, L, L)
    for at_most in (False, True):
        res = set_argmin(u, U, k=k, at_most=at_most)
        assert res.y.dtype == torch.float32 and feasible(res.y, k, at_most).all()
        check_move_optimal(res, u.double(), U.double(), k, at_most, slack=1e-4)


@pytest.mark.parametrize("at_most", [False, True])
def test_pairwise_cardinality_from_init(at_most):
    torch.manual_seed(6)
    B, L, k = 8, 7, 3
    u = torch.randn(B, L, dtype=torch.float64)
    U = torch.randn(L, L, dtype=torch.float64)
    sizes = torch.randint(0, k + 1, (B,)) if at_most else torch.full((B,), k)
    init = (torch.rand(B, L).argsort(1).argsort(1) < sizes.unsqueeze(1)).to(torch.int64)   # random sets
    res = set_argmin(u, U, k=k, at_most=at_most, init=init)
    assert feasible(res.y, k, at_most).all()
    assert (res.energy <= set_energy(init, u, U) + 1e-12).all()
    check_move_optimal(res, u, U.expand(B, L, L), k, at_most)
    unchanged = res.flips == 0
    assert torch.equal(res.y[unchanged], init[unchanged].double())
    # a local optimum is a fixed point of the search
    again = set_argmin(u, U, k=k, at_most=at_most, init=res.y)
    assert torch.equal(again.y, res.y) and (again.flips == 0).all()


def test_pairwise_cardinality_relaxation_steps():
    """steps=0 skips the relaxation (the search starts from the rounding of the uniform start); any number
    of steps and a given step size still end in a feasible, move-optimal set."""
    torch.manual_seed(7)
    B, L, k = 10, 8, 5
    u = torch.randn(B, L, dtype=torch.float64)
    U = torch.randn(B, L, L, dtype=torch.float64)
    for at_most in (False, True):
        for steps, step_size in ((0, None), (1, None), (300, None), (50, 0.01)):
            res = set_argmin(u, U, k=k, at_most=at_most, steps=steps, step_size=step_size)
            assert feasible(res.y, k, at_most).all()
            check_move_optimal(res, u, U, k, at_most)


@pytest.mark.parametrize("k", [None, 4])
def test_pairwise_search_max_rounds(k):
    """max_rounds caps the rounds; a problem that moved fewer times than the cap stopped at a local optimum,
    and the capped search is the first rounds of the full one."""
    torch.manual_seed(9)
    B, L = 16, 9
    u = torch.randn(B, L, dtype=torch.float64)
    U = torch.randn(B, L, L, dtype=torch.float64)
    init = torch.zeros(B, L)
    init[:, :4] = 1                                                        # far from optimal in most problems
    full = set_argmin(u, U, k=k, init=init)
    assert full.flips.max() >= 2
    for cap in (0, 1, 2):
        res = set_argmin(u, U, k=k, init=init, max_rounds=cap)
        assert (res.flips <= cap).all() and torch.equal(res.flips, full.flips.clamp(max=cap))
        done = res.flips < cap
        assert torch.equal(res.y[done], full.y[done])
        if k is not None:
            assert feasible(res.y, k, False).all()
    assert torch.equal(set_argmin(u, U, k=k, init=init, max_rounds=int(full.flips.max())).y, full.y)
    with pytest.raises(ValueError, match="max_rounds must be an int"):
        set_argmin(u, U, k=k, max_rounds=-1)


def project_by_bisection(v, k, at_most):
    """The Euclidean projection onto {z in [0,1]^L : sum z = k} (<= k with at_most) by bisection on the
    shift of clamp(v - tau, 0, 1), independently of pyebm's breakpoint search."""
    lo = torch.zeros_like(v[:, :1]) if at_most else v.min(1, keepdim=True).values - 1
    hi = v.max(1, keepdim=True).values.clamp(min=0)
    for _ in range(200):
        mid = (lo + hi) / 2
        over = (v - mid).clamp(0, 1).sum(1, keepdim=True) > k
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    return (v - hi).clamp(0, 1)


@pytest.mark.parametrize("at_most", [False, True])
@pytest.mark.parametrize("L", [1, 2, 7, 33])
def test_capped_simplex_projection_matches_bisection(L, at_most):
    from pyebm.discrete.sets import _project_k

    torch.manual_seed(8 + L)
    v = 2 * torch.randn(9, L, dtype=torch.float64)
    v[0] = 0.3                                                           # all equal
    v[1, : L // 2] = v[1, 0]                                             # ties
    for k in range(L + 1):
        z = _project_k(v, k, at_most)
        assert ((z >= 0) & (z <= 1)).all()
        s = z.sum(1)
        assert ((s <= k + 1e-9) if at_most else (s - k).abs() < 1e-9).all()
        torch.testing.assert_close(z, project_by_bisection(v, k, at_most), atol=1e-9, rtol=0)
        # the projection is the nearest feasible point: closer to v than any random feasible point
        w = project_by_bisection(torch.randn(64, L, dtype=torch.float64) * 3, k, at_most)
        assert (((v.unsqueeze(1) - z.unsqueeze(1)) ** 2).sum(-1) <= ((v.unsqueeze(1) - w) ** 2).sum(-1) + 1e-9).all()


def test_set_bad_input():
    u = torch.randn(2, 4)
    with pytest.raises(ValueError, match="y must be binary"):
        set_energy(torch.full((2, 4), 0.5), u)
    with pytest.raises(ValueError, match="init must be binary"):
        set_argmin(u, torch.zeros(4, 4), init=torch.full((2, 4), 2.0))
    with pytest.raises(ValueError, match="y must have the shape of u"):
        set_energy(torch.zeros(2, 3), u)
    with pytest.raises(ValueError, match="L = 0"):
        set_argmin(torch.randn(2, 0))
    with pytest.raises(ValueError, match=r"U must be \[B, L, L\]"):
        set_argmin(u, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="k must be an int in"):
        set_argmin(u, k=5)
    with pytest.raises(ValueError, match="at_most=True needs k"):
        set_argmin(u, at_most=True)
    U = torch.zeros(4, 4)
    for bad in (5, -1, 2.5, 2.0, True, "2", [2]):
        with pytest.raises(ValueError, match=r"k must be an int in \[0, 4\]"):
            set_argmin(u, U, k=bad)
    with pytest.raises(ValueError, match="at_most=True needs k"):
        set_argmin(u, U, at_most=True)
    with pytest.raises(TypeError, match="at_most must be True or False"):
        set_argmin(u, U, k=2, at_most=1)
    with pytest.raises(ValueError, match=r"init must be a feasible set \(exactly k = 2 labels\); problem 1 has 3"):
        set_argmin(u, U, k=2, init=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))
    with pytest.raises(ValueError, match=r"init must be a feasible set \(at most k = 1 labels\); problem 0 has 2"):
        set_argmin(u, U, k=1, at_most=True, init=torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="init must be binary"):
        set_argmin(u, U, k=2, init=torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="steps must be an int"):
        set_argmin(u, U, k=2, steps=-1)
    with pytest.raises(ValueError, match="step_size must be a number > 0"):
        set_argmin(u, U, k=2, step_size=0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        set_argmin(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(TypeError, match="real floating"):
        set_argmin(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"u must be \[B, L\]"):
        set_argmin(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="U is torch.float64"):
        set_argmin(u, torch.zeros(4, 4, dtype=torch.float64))


# -- permutations ------------------------------------------------------------------------------------

def all_perms(k):
    return torch.tensor(list(itertools.permutations(range(k))))  # [k!, k]


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_permutahedron_sort_is_the_brute_force_minimum(k):
    theta = torch.randn(7, k, dtype=torch.float64)
    w = torch.randn(k, dtype=torch.float64)
    P = all_perms(k)
    for ww in (None, w):
        res = permutation_argmin(theta, ww)
        ws = torch.arange(1, k + 1, dtype=torch.float64) if ww is None else ww.sort().values
        E_all = -(theta.unsqueeze(1) * ws[P]).sum(-1)                 # [B, k!]
        torch.testing.assert_close(res.energy, E_all.min(1).values)
        torch.testing.assert_close(res.energy, permutation_energy(res.perm, theta, ww))
        assert res.exact


def test_permutahedron_ties_and_unbatched():
    res = permutation_argmin(torch.tensor([0.5, 2.0, 0.5, -1.0]))
    assert res.perm.tolist() == [1, 3, 2, 0] and res.energy.dim() == 0
    assert float(res.energy) == -(0.5 * 2 + 2.0 * 4 + 0.5 * 3 - 1.0 * 1)


@pytest.mark.parametrize("method", ["scipy", "auction"])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 6])
def test_assignment_is_the_brute_force_minimum(method, k):
    torch.manual_seed(k)
    theta = torch.randn(9, k, k, dtype=torch.float64)
    P = all_perms(k)
    E_all = -theta[:, torch.arange(k).expand(P.shape[0], k), P].sum(-1)  # [B, k!]
    res = permutation_argmin(theta, method=method)
    torch.testing.assert_close(res.energy, E_all.min(1).values)
    torch.testing.assert_close(res.energy, permutation_energy(res.perm, theta))
    assert res.exact == (method == "scipy")
    M = res.matrix(torch.float64)
    assert torch.equal(M.sum(1), torch.ones(9, k, dtype=torch.float64))
    assert torch.equal(M.sum(2), torch.ones(9, k, dtype=torch.float64))


def test_auction_matches_scipy_on_larger_problems_fp32():
    torch.manual_seed(3)
    for k, B in ((17, 5), (40, 3)):
        theta = torch.rand(B, k, k)
        exact = permutation_argmin(theta, method="scipy")
        auc = permutation_argmin(theta, method="auction")
        assert (auc.energy >= exact.energy - 1e-5).all()
        assert (auc.energy <= exact.energy + auc.gap_bound + 1e-5).all()
    # integer scores: the optimum beats every other assignment by >= 1 > k * eps, so the auction is exact
    theta = torch.randint(0, 50, (6, 12, 12)).double()
    assert torch.equal(permutation_argmin(theta, method="auction").energy,
                       permutation_argmin(theta, method="scipy").energy)
    # equal scores everywhere: every assignment is optimal
    flat = permutation_argmin(torch.ones(2, 5, 5), method="auction")
    assert torch.equal(torch.sort(flat.perm, 1).values, torch.arange(5).expand(2, 5))


def test_assignment_empty_batch():
    res = permutation_argmin(torch.randn(0, 4, 4))
    assert res.perm.shape == (0, 4) and res.energy.shape == (0,)


def scipy_loop_perm(theta):
    """The permutations of a plain loop of scipy's solver (maximize=True) on theta's float64 host copy."""
    from scipy.optimize import linear_sum_assignment

    host = theta.detach().cpu().double().numpy()
    out = []
    for m in host:
        rows, cols = linear_sum_assignment(m, maximize=True)
        assert rows.tolist() == list(range(m.shape[0]))
        out.append(cols.tolist())
    return torch.tensor(out, dtype=torch.int64).reshape(host.shape[0], host.shape[1])


def assignment_inputs():
    """(name, theta) pairs: random odd sizes, k = 1, dtypes, ties, strided and expanded views."""
    g = torch.Generator().manual_seed(7)
    yield "k=1", torch.randn(5, 1, 1, generator=g)
    yield "B=1 k=1 fp64", torch.randn(1, 1, 1, generator=g, dtype=torch.float64)
    for B, k in ((1, 2), (3, 3), (17, 5), (4, 17), (2, 40)):
        yield f"B={B} k={k} fp32", torch.randn(B, k, k, generator=g)
        yield f"B={B} k={k} fp64", torch.randn(B, k, k, generator=g, dtype=torch.float64)
    yield "fp16", torch.randn(6, 7, 7, generator=g).half()
    yield "bf16", torch.randn(6, 7, 7, generator=g).bfloat16()
    yield "ties", torch.randint(0, 3, (40, 6, 6), generator=g).float()
    yield "all equal", torch.full((3, 4, 4), 2.5)
    yield "transposed", torch.randn(5, 9, 9, generator=g).transpose(1, 2)
    yield "strided slice", torch.randn(7, 12, 20, generator=g, dtype=torch.float64)[::2, 1:10, 3:21:2]
    yield "expanded", torch.randn(1, 6, 6, generator=g).expand(4, 6, 6)
    yield "huge fp64 (sum overflows)", torch.randn(3, 5, 5, generator=g, dtype=torch.float64) * 1e307
    yield "large fp16 (sum overflows)", (torch.rand(3, 6, 6, generator=g) * 6e4).half()


@pytest.mark.parametrize("name,theta", list(assignment_inputs()), ids=[n for n, _ in assignment_inputs()])
def test_scipy_assignment_is_the_scipy_loop(name, theta):
    """method='scipy' (and 'auto') returns exactly the permutations of a loop of scipy's solver with
    maximize=True: it minimises the negated float64 copy, and scipy's maximize negates (exactly) the same
    copy, so the solver sees the same matrices bit for bit."""
    expected = scipy_loop_perm(theta)
    before = theta.clone()
    for method in ("scipy", "auto"):
        res = permutation_argmin(theta, method=method)
        assert res.exact and res.gap_bound is None
        assert res.perm.dtype == torch.int64 and res.perm.is_contiguous()
        assert torch.equal(res.perm, expected)
        # the energy is permutation_energy's own computation on the same perm and theta: equal bit for bit
        assert res.energy.dtype == theta.dtype and res.energy.shape == (theta.shape[0],)
        assert torch.equal(res.energy, permutation_energy(res.perm, theta))
    assert torch.equal(theta, before)  # the caller's theta is read, never negated in place


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_scipy_assignment_fp32_and_views_against_brute_force(k):
    P = all_perms(k)
    base = torch.randn(8, k, k + 3)
    for theta in (base[..., 1:k + 1], base[..., :k].transpose(1, 2), base[..., :k].contiguous()):
        res = permutation_argmin(theta, method="scipy")
        E_all = -theta.double()[:, torch.arange(k).expand(P.shape[0], k), P].sum(-1)  # [B, k!] in float64
        torch.testing.assert_close(res.energy.double(), E_all.min(1).values, rtol=1e-6, atol=1e-6)


def test_scipy_assignment_keeps_the_energy_differentiable():
    theta = torch.randn(4, 5, 5, dtype=torch.float64, requires_grad=True)
    res = permutation_argmin(theta, method="scipy")
    assert res.energy.requires_grad and not res.perm.requires_grad
    res.energy.sum().backward()
    assert torch.equal(theta.grad, -res.matrix(torch.float64))
    with torch.no_grad():
        assert not permutation_argmin(theta, method="scipy").energy.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assignment_non_finite_and_empty(dtype):
    for bad in (float("nan"), float("inf"), -float("inf")):
        theta = torch.rand(3, 4, 4, dtype=dtype)
        theta[1, 2, 3] = bad
        for method in ("auto", "scipy", "auction"):
            with pytest.raises(ValueError, match="theta contains NaN or Inf"):
                permutation_argmin(theta, method=method)
        # the NaN / Inf error still comes before the argument errors checked after it
        with pytest.raises(ValueError, match="theta contains NaN or Inf"):
            permutation_argmin(theta, method="hungarian")
        with pytest.raises(ValueError, match="theta contains NaN or Inf"):
            permutation_argmin(theta, w=torch.ones(4))
    for method in ("scipy", "auto"):
        res = permutation_argmin(torch.randn(0, 3, 3, dtype=dtype), method=method)
        assert res.perm.shape == (0, 3) and res.perm.dtype == torch.int64
        assert res.energy.shape == (0,) and res.energy.dtype == dtype and res.exact


def test_sinkhorn_against_plain_scaling_and_the_assignment():
    torch.manual_seed(4)
    theta = torch.randn(3, 5, 5, dtype=torch.float64)
    tau = 0.7
    P = sinkhorn(theta, tau, iters=200)
    # plain Sinkhorn-Knopp on K = exp(theta / tau): alternate row and column scalings
    K = (theta / tau).exp()
    r = torch.ones(3, 5, dtype=torch.float64)
    c = torch.ones(3, 5, dtype=torch.float64)
    for _ in range(200):
        r = 1.0 / (K * c.unsqueeze(1)).sum(2)
        c = 1.0 / (K * r.unsqueeze(2)).sum(1)
    torch.testing.assert_close(P, r.unsqueeze(2) * K * c.unsqueeze(1))
    torch.testing.assert_close(P.sum(1), torch.ones(3, 5, dtype=torch.float64))
    torch.testing.assert_close(P.sum(2), torch.ones(3, 5, dtype=torch.float64))
    torch.testing.assert_close(sinkhorn(theta, tau, 200, log=True).exp(), P)
    # small tau: close to the permutation matrix of the exact assignment
    exact = permutation_argmin(theta)
    soft = sinkhorn(theta, 0.01, iters=2000)
    assert torch.equal(soft.argmax(-1), exact.perm)
    torch.testing.assert_close(soft, exact.matrix(torch.float64), atol=2e-2, rtol=0)


def test_permutation_bad_input():
    theta = torch.randn(2, 4, 4)
    with pytest.raises(ValueError, match="not a permutation"):
        permutation_energy(torch.tensor([[0, 1, 1, 3], [0, 1, 2, 3]]), theta)
    with pytest.raises(ValueError, match="not a permutation"):
        permutation_energy(torch.tensor([[0, 1, 2, 4], [0, 1, 2, 3]]), theta)
    with pytest.raises(TypeError, match="integer tensor"):
        permutation_energy(torch.zeros(2, 4), theta)
    with pytest.raises(ValueError, match=r"perm must be \[B, k\]"):
        permutation_energy(torch.zeros(2, 3, dtype=torch.long), theta)
    with pytest.raises(ValueError, match="k = 0"):
        permutation_argmin(torch.randn(2, 0))
    with pytest.raises(ValueError, match="square"):
        permutation_argmin(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="shape"):
        permutation_argmin(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="method must be one of"):
        permutation_argmin(theta, method="hungarian")
    with pytest.raises(ValueError, match="method='sort' solves the permutahedron"):
        permutation_argmin(theta, method="sort")
    with pytest.raises(ValueError, match="solved exactly by method='sort'"):
        permutation_argmin(torch.randn(2, 4), method="scipy")
    with pytest.raises(ValueError, match="w applies to the permutahedron"):
        permutation_argmin(theta, w=torch.ones(4))
    with pytest.raises(ValueError, match=r"w must be \[k\]"):
        permutation_argmin(torch.randn(2, 4), w=torch.ones(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        permutation_argmin(torch.tensor([[[0.0, float("inf")], [1.0, 0.0]]]))
    with pytest.raises(ValueError, match="eps must be"):
        permutation_argmin(theta, method="auction", eps=0.0)
    with pytest.raises(RuntimeError, match="max_rounds"):
        permutation_argmin(torch.rand(1, 30, 30), method="auction", max_rounds=2)
    with pytest.raises(ValueError, match="tau must be"):
        sinkhorn(theta, tau=0.0)
    with pytest.raises(ValueError, match="square"):
        sinkhorn(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="real floating"):
        sinkhorn(torch.ones(3, 3, dtype=torch.long))


@pytest.mark.gpu
def test_cuda_auction_and_sort_match_scipy():
    torch.manual_seed(5)
    theta = torch.rand(64, 24, 24, device="cuda")
    exact = permutation_argmin(theta)                     # scipy through the CPU
    auc = permutation_argmin(theta, method="auction")     # on the GPU
    assert auc.perm.device.type == "cuda" and exact.perm.device.type == "cuda"
    assert (auc.energy >= exact.energy - 1e-4).all()
    assert (auc.energy <= exact.energy + auc.gap_bound + 1e-4).all()
    r = torch.randn(16, 9, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(permutation_argmin(r).perm.cpu(), permutation_argmin(r.cpu()).perm)
    u = torch.randn(8, 6, device="cuda", dtype=torch.float64)
    U = torch.randn(8, 6, 6, device="cuda", dtype=torch.float64)
    res = set_argmin(u, U)
    torch.testing.assert_close(res.energy, set_energy(res.y, u, U))
    for at_most in (False, True):
        res = set_argmin(u, U, k=3, at_most=at_most)
        assert res.y.device.type == "cuda" and res.flips.device.type == "cuda"
        assert feasible(res.y, 3, at_most).all()
        torch.testing.assert_close(res.energy, set_energy(res.y, u, U))
        check_move_optimal(res, u, U, 3, at_most)
