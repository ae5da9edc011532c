"""pyebm.rerank against an eager loop that scores one candidate at a time with each model's plain forward
(or the full-recompute reference for EBT): energies, top-k, states, distributions, masks, ties, refinement
and bad input."""
import math

import pytest
import torch
from torch import nn

import pyebm
from pyebm.models import EBT, EBTPolicy
from pyebm.policies import EnergyPolicy
from pyebm.reference import ebt as ebt_ref


def eager_scores(fn, x, y):
    """E [B, N] by one call per (context, candidate): fn(x[b:b+1], y[b, n]) -> a number."""
    B, N = y.shape[:2]
    E = torch.empty(B, N, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            E[b, n] = float(fn(b, n))
    return E


def eager_topk(E, mask, k):
    """Indices of the k lowest valid energies per row, ties by position (plain Python sort)."""
    out = []
    for b in range(E.shape[0]):
        valid = [n for n in range(E.shape[1]) if mask[b, n]]
        out.append(sorted(valid, key=lambda n: (float(E[b, n]), n))[:k])
    return torch.tensor(out)


def check_against(res, E_ref, y, k, mask=None, atol=1e-10, rtol=1e-10):
    B, N = E_ref.shape
    mask = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    torch.testing.assert_close(res.all_energy.double(), torch.where(mask, E_ref, math.inf), atol=atol, rtol=rtol)
    idx = eager_topk(E_ref, mask, k)
    assert torch.equal(res.index, idx)
    assert res.index.shape == (B, k) and res.energy.shape == (B, k)
    for b in range(B):
        for j in range(k):
            assert torch.equal(res.states[b, j], y[b, idx[b, j]])
    torch.testing.assert_close(res.energy.double(), torch.gather(E_ref, 1, idx), atol=atol, rtol=rtol)


# -- models ----------------------------------------------------------------------------------------

def test_mlp_energy_matches_eager_loop():
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(5, 3, hidden=(16, 16), dtype=torch.float64)
    B, N, k = 3, 17, 4
    x, y = torch.randn(B, 5, dtype=torch.float64), torch.randn(B, N, 3, dtype=torch.float64)
    res = pyebm.rerank(m, x, y, k=k)
    with torch.no_grad():
        E_ref = eager_scores(lambda b, n: m(x[b:b + 1], y[b:b + 1, n])[0], x, y)
    check_against(res, E_ref, y, k)
    assert res.probs is None and res.refined is None and res.mask.all()
    assert torch.equal(res.best, res.states[:, 0]) and torch.equal(res.best_energy, res.energy[:, 0])


def test_energy_called_once_on_all_candidates():
    m = pyebm.MLPEnergy(4, 2, hidden=(8,), dtype=torch.float64)
    calls = []

    class Counting:
        event_shape = (2,)

        def prepare(self, x):
            calls.append(("prepare", tuple(x.shape)))
            return m.prepare(x)

        def energy(self, ctx, y):
            calls.append(("energy", tuple(y.shape)))
            return m.energy(ctx, y)

        def energy_and_grad(self, ctx, y):  # pragma: no cover - not used without refine
            raise AssertionError("rerank without refine needs no gradient")

    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 33, 2, dtype=torch.float64)
    res = pyebm.rerank(Counting(), x, y, k=2)
    assert calls == [("prepare", (6, 4)), ("energy", (6, 33, 2))]
    torch.testing.assert_close(res.all_energy, m.energy(m.prepare(x), y))


def test_plain_module_and_function():
    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))

        def forward(self, x, y):  # x [B, 3], y [B, K, 3] -> [B, K]
            return ((y - x.unsqueeze(1)) ** 2 * self.w.exp()).sum(-1)

    f = Quadratic()
    B, N, k = 4, 9, 3
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randn(B, N, 3, dtype=torch.float64)
    res = pyebm.rerank(f, x, y, k=k)
    with torch.no_grad():
        E_ref = eager_scores(lambda b, n: f(x[b:b + 1], y[b:b + 1, n:n + 1])[0, 0], x, y)
    check_against(res, E_ref, y, k)
    assert not res.energy.requires_grad
    res_fn = pyebm.rerank(lambda xx, yy: f(xx, yy), x, y, k=k)
    assert torch.equal(res_fn.index, res.index)


def test_ebt_vocabulary_candidates_match_reference():
    torch.manual_seed(0)
    V = 32
    model = EBT(vocab_size=V, embedding_dim=16, num_transformer_blocks=1, multiheaded_attention_heads=2,
                context_length=12).double()
    B, S, N, k = 2, 5, 6, 2
    tok = torch.randint(0, V, (B, S))
    # continuations proposed elsewhere: sampled next tokens as one-hot vocabulary distributions
    y = torch.nn.functional.one_hot(torch.randint(0, V, (B, N)), V).double()
    res = pyebm.rerank(model, tok, y, k=k, temperature=0.5)
    params = {n: p.detach() for n, p in model.named_parameters()}
    land = model.config.num_landscapes - 1

    def full_recompute(b, n):
        filler = torch.softmax(torch.randn(1, S, V, dtype=torch.float64), -1)
        filler[0, -1] = y[b, n]
        return ebt_ref.energy(params, model.config, tok[b:b + 1], filler, land)[0, -1]

    E_ref = eager_scores(full_recompute, tok, y)
    check_against(res, E_ref, y, k, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(res.probs, torch.softmax(-E_ref / 0.5, dim=1), atol=1e-9, rtol=1e-9)


def test_ebt_policy_and_energy_policy_action_chunks():
    torch.manual_seed(0)
    m = EBTPolicy(2, horizon=6, embed_dim=8, layers=1, heads=2, n_obs_steps=2, dtype=torch.float64)
    B, N, k = 3, 7, 3
    obs = torch.randn(B, 2, 8, dtype=torch.float64)
    chunks = torch.randn(B, N, 6, 2, dtype=torch.float64)
    with torch.no_grad():
        E_ref = eager_scores(lambda b, n: m(obs[b:b + 1], chunks[b:b + 1, n])[0], obs, chunks)
    res = pyebm.rerank(m, obs, chunks, k=k)
    check_against(res, E_ref, chunks, k)
    pol = EnergyPolicy.ebt_policy(m, candidates=4)
    res_pol = pyebm.rerank(pol, obs, chunks, k=k)
    check_against(res_pol, E_ref, chunks, k)
    # refined by the policy's own rule: its bounds hold, and the energies are those of the refined chunks
    bounded = EnergyPolicy.ebt_policy(m, candidates=4, max_steps=3, bounds=(-0.5, 0.5))
    res_ref = pyebm.rerank(bounded, obs, chunks, k=k, refine=bounded.descent)
    assert res_ref.states.shape == (B, k, 6, 2) and res_ref.states.abs().max() <= 0.5
    with torch.no_grad():
        torch.testing.assert_close(res_ref.energy, m(obs, res_ref.states))


def test_energy_policy_over_flattened_mlp_chunks():
    torch.manual_seed(0)
    e = pyebm.MLPEnergy(2 * 3, 4 * 2, hidden=(16,), dtype=torch.float64)
    pol = EnergyPolicy.ibc(e, action_dim=2, horizon=4, n_obs_steps=2)
    B, N = 2, 5
    obs = torch.randn(B, 2, 3, dtype=torch.float64)
    chunks = torch.randn(B, N, 4, 2, dtype=torch.float64)
    res = pyebm.rerank(pol, obs, chunks, k=2)
    assert res.states.shape == (B, 2, 4, 2)
    with torch.no_grad():
        E_ref = eager_scores(lambda b, n: e(obs[b:b + 1].reshape(1, 6), chunks[b:b + 1, n].reshape(1, 8))[0],
                             obs, chunks)
    check_against(res, E_ref, chunks, 2)


# -- masks, lists, ties, distributions ---------------------------------------------------------------

def test_list_of_different_lengths_is_padded_and_masked():
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(3, 2, hidden=(8,), dtype=torch.float64)
    counts = [5, 1, 3]
    x = torch.randn(3, 3, dtype=torch.float64)
    props = [torch.randn(n, 2, dtype=torch.float64) for n in counts]
    res = pyebm.rerank(m, x, props, k=1, temperature=2.0)
    assert res.mask.tolist() == [[n < c for n in range(5)] for c in counts]
    for b, p in enumerate(props):
        with torch.no_grad():
            E_b = m(x[b:b + 1].expand(p.shape[0], 3), p)  # [N_b]
        j = int(torch.argmin(E_b))
        assert int(res.index[b, 0]) == j and torch.equal(res.states[b, 0], p[j])
        torch.testing.assert_close(res.probs[b, :counts[b]], torch.softmax(-E_b / 2.0, 0))
        assert (res.probs[b, counts[b]:] == 0).all() and torch.isinf(res.all_energy[b, counts[b]:]).all()
    assert float(res.probs[1, 0]) == 1.0


def test_mask_excludes_candidates_even_with_lowest_energy():
    E_fixed = torch.tensor([[3.0, -5.0, 1.0, 2.0], [0.5, 0.25, -9.0, 4.0]], dtype=torch.float64)

    def f(x, y):
        return y[..., 0]

    y = E_fixed.unsqueeze(-1)
    mask = torch.tensor([[True, False, True, True], [True, True, False, True]])
    res = pyebm.rerank(f, 2, y, k=2, mask=mask, temperature=1.0)
    assert res.index.tolist() == [[2, 3], [1, 0]]
    assert res.energy.tolist() == [[1.0, 2.0], [0.25, 0.5]]
    p = res.probs
    assert float(p[0, 1]) == 0.0 and float(p[1, 2]) == 0.0
    torch.testing.assert_close(p.sum(1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(p[0, [0, 2, 3]], torch.softmax(-E_fixed[0, [0, 2, 3]], 0))


def test_ties_keep_proposal_order():
    E_fixed = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    y = E_fixed.unsqueeze(-1)
    res = pyebm.rerank(lambda x, yy: yy[..., 0], None, y, k=4)
    assert res.index.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3]]
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, True]])
    res = pyebm.rerank(lambda x, yy: yy[..., 0], None, y, k=3, mask=mask)
    assert res.index.tolist() == [[1, 4, 0], [1, 2, 3]]


def test_nonfinite_energies_rank_last_and_get_zero_probability():
    E_fixed = torch.tensor([[float("nan"), 1.0, float("inf"), 0.0], [float("nan"), float("inf"), float("nan"), 1.0]])
    y = E_fixed.unsqueeze(-1)
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    res = pyebm.rerank(lambda x, yy: yy[..., 0], None, y, k=3, mask=mask, temperature=1.0)
    assert res.index.tolist() == [[3, 1, 0], [0, 1, 2]]
    assert res.probs[0].tolist() == pytest.approx([0.0, 1 / (1 + math.e), 0.0, math.e / (1 + math.e)])
    # no finite valid energy: uniform over the valid candidates, 0 on the masked one
    assert res.probs[1].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])


def test_temperature_distribution_matches_softmax():
    torch.manual_seed(1)
    m = pyebm.MLPEnergy(2, 3, hidden=(8,))
    x, y = torch.randn(4, 2), torch.randn(4, 64, 3)
    for T in (0.1, 1.0, 7.5):
        res = pyebm.rerank(m, x, y, temperature=T)
        torch.testing.assert_close(res.probs, torch.softmax(-m.energy(m.prepare(x), y) / T, dim=1))


def reference_select_and_probs(E, mask, k, T):
    """The selection and distribution written out plainly: a stable sort of the energies with non-finite ones
    (and then masked ones) last by class, and softmax(-E / T) over the finite valid entries (uniform over the
    valid ones in a row without any)."""
    finite = torch.isfinite(E)
    key = torch.where(finite & mask, E, torch.full_like(E, math.inf))
    order = torch.sort(key, dim=1, stable=True).indices
    cls = torch.where(mask, torch.where(finite, 0, 1), 2).to(torch.int8)
    order = torch.gather(order, 1, torch.sort(torch.gather(cls, 1, order), dim=1, stable=True).indices)
    ok = finite & mask
    logits = torch.where(ok, -E / T, torch.full_like(E, -math.inf))
    fallback = torch.where(mask, torch.zeros_like(E), torch.full_like(E, -math.inf))
    logits = torch.where(~ok.any(dim=1, keepdim=True), fallback, logits)
    return order[:, :k], torch.softmax(logits, dim=1)


def awkward_energies(B, N, dtype, g):
    """Random energies with ties, NaN, +-inf, rows without a finite entry, and a mask."""
    E = torch.randint(-3, 4, (B, N), generator=g).to(dtype) * 0.5      # many ties
    E = torch.where(torch.rand(B, N, generator=g) < 0.5, torch.randn(B, N, generator=g, dtype=dtype), E)
    bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=dtype)
    E = torch.where(torch.rand(B, N, generator=g) < 0.15, bad[torch.randint(0, 3, (B, N), generator=g)], E)
    if B > 2:
        E[1] = bad[torch.randint(0, 3, (N,), generator=g)]                 # no finite energy in row 1
    mask = torch.rand(B, N, generator=g) < 0.8
    mask[:, 0] = True
    return E, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,N", [(1, 1), (1, 7), (3, 1), (4, 5), (5, 64), (2, 257)])
def test_selection_and_distribution_match_the_plain_reference(dtype, B, N):
    """Every entry valid (one stable sort, no mask ops) and with a mask, against the reference above: the
    same indices, states and energies, and the same probabilities bit for bit (-E / T and E / (-T) are the
    same number: IEEE division is sign-symmetric; softmax then sees the same logits)."""
    g = torch.Generator().manual_seed(B * 1000 + N)
    E, mask = awkward_energies(B, N, dtype, g)
    y = torch.randn(B, N, 3, generator=g, dtype=dtype)
    f = lambda x, yy: E.clone()  # noqa: E731  (the energies above, whatever the candidates)
    for T in (None, 0.3, 1.0, 7.0):
        for m in (None, mask, torch.ones(B, N, dtype=torch.bool)):
            k = N if m is None else int(m.sum(1).min())
            for kk in sorted({1, k}):
                res = pyebm.rerank(f, None, y, k=kk, temperature=T, mask=m)
                full = torch.ones(B, N, dtype=torch.bool) if m is None else m
                idx, probs = reference_select_and_probs(E, full, kk, 1.0 if T is None else T)
                assert torch.equal(res.index, idx)
                assert torch.equal(res.states, torch.gather(y, 1, idx.unsqueeze(-1).expand(B, kk, 3)))
                torch.testing.assert_close(res.energy, torch.gather(E, 1, idx), equal_nan=True, rtol=0, atol=0)
                torch.testing.assert_close(res.all_energy, torch.where(full, E, math.inf), equal_nan=True,
                                           rtol=0, atol=0)
                assert torch.equal(res.mask, full) and res.all_energy.data_ptr() != E.data_ptr()
                if T is None:
                    assert res.probs is None
                else:
                    torch.testing.assert_close(res.probs, probs, rtol=0, atol=0, equal_nan=True)


def test_list_of_equal_lengths_and_results_of_their_own():
    """A list whose contexts all have N proposals takes the unmasked path; the fields are values of their own
    (the energy's output is not shared with a user function's tensor or the refining descent's result)."""
    torch.manual_seed(3)
    m = pyebm.MLPEnergy(3, 2, hidden=(8,), dtype=torch.float64)
    x, y = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    a = pyebm.rerank(m, x, list(y), k=2, temperature=0.5)
    b = pyebm.rerank(m, x, y, k=2, temperature=0.5)
    for f in ("index", "states", "energy", "all_energy", "probs", "mask"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    stored = torch.randn(3, 5, dtype=torch.float64)
    res = pyebm.rerank(lambda xx, yy: stored, None, y, k=1)
    assert torch.equal(res.all_energy, stored) and res.all_energy.data_ptr() != stored.data_ptr()
    r = pyebm.rerank(m, x, y, k=1, refine=pyebm.Descent(steps=2, step_size=0.01))
    assert torch.equal(r.all_energy, r.refined.energy) and r.all_energy.data_ptr() != r.refined.energy.data_ptr()


# -- refine ------------------------------------------------------------------------------------------

def test_refine_descends_from_the_proposals():
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(3, 2, hidden=(16,), dtype=torch.float64)
    B, N, k = 2, 6, 2
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randn(B, N, 2, dtype=torch.float64)
    cfg = pyebm.Descent(steps=5, step_size=0.05)
    res = pyebm.rerank(m, x, y, k=k, refine=cfg)
    direct = pyebm.minimize(m, x, candidates=N, config=cfg, init=y)
    torch.testing.assert_close(res.all_energy, direct.energy)
    check_against(res, direct.energy, direct.y, k)
    assert res.refined is not None and not torch.equal(res.refined.y, y)
    # the proposals were not written to
    assert res.refined.y.data_ptr() != y.data_ptr()
    # refined energies are no higher than the proposals' (small steps on a smooth energy)
    before = pyebm.rerank(m, x, y, k=N)
    assert (res.all_energy <= before.all_energy + 1e-12).all()


def test_refine_with_padding_and_plain_module():
    f = lambda x, y: ((y - 1.0) ** 2).sum(-1)  # noqa: E731
    props = [torch.zeros(3, 2), torch.full((1, 2), 2.0)]
    res = pyebm.rerank(f, None, props, k=1, refine=pyebm.Descent(steps=50, step_size=0.25))
    torch.testing.assert_close(res.best, torch.ones(2, 2), atol=1e-5, rtol=0)
    assert res.index[:, 0].tolist() == [0, 0]


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_input():
    m = pyebm.MLPEnergy(3, 2, hidden=(8,))
    x, y = torch.randn(2, 3), torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match="k = 5 but a context has only 4 proposals"):
        pyebm.rerank(m, x, y, k=5)
    with pytest.raises(ValueError, match="k = 3 but a context has only 2 valid"):
        pyebm.rerank(m, x, y, k=3, mask=torch.tensor([[True] * 4, [True, False, True, False]]))
    with pytest.raises(ValueError, match="k = 2 but a context has only 1 proposals"):
        pyebm.rerank(m, x, [y[0], y[1, :1]], k=2)
    with pytest.raises(ValueError, match="N = 0"):
        pyebm.rerank(m, x, torch.randn(2, 0, 2))
    with pytest.raises(ValueError, match=r"candidates\[1\] has no proposals"):
        pyebm.rerank(m, x, [y[0], y[1, :0]])
    with pytest.raises(ValueError, match="empty list"):
        pyebm.rerank(m, x, [])
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        pyebm.rerank(m, x, y, k=0)
    with pytest.raises(ValueError, match=r"mask must be \[B, N\] = \[2, 4\]"):
        pyebm.rerank(m, x, y, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        pyebm.rerank(m, x, y, mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="mask is built from the lengths"):
        pyebm.rerank(m, x, [y[0], y[1]], mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="event shape"):
        pyebm.rerank(m, x, [y[0], torch.randn(3, 3)])
    with pytest.raises(ValueError, match=r"event = \[2\]"):
        pyebm.rerank(m, x, torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="context must be"):
        pyebm.rerank(m, torch.randn(3, 3), y)
    with pytest.raises(TypeError, match="real floating point"):
        pyebm.rerank(m, x, torch.ones(2, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be"):
        pyebm.rerank(m, x, y, temperature=0.0)
    with pytest.raises(TypeError, match="refine must be a pyebm.Descent"):
        pyebm.rerank(m, x, y, refine="descent")
    with pytest.raises(ValueError, match="dfo"):
        pyebm.rerank(m, x, y, refine=pyebm.Descent(method="dfo", steps=2, lower=-1.0, upper=1.0))
    with pytest.raises(ValueError, match=r"E \[B, N\]"):
        pyebm.rerank(lambda a, b: b.sum(), None, y)
    with pytest.raises(TypeError, match="candidates must be a tensor"):
        pyebm.rerank(m, x, y.numpy())


def test_empty_batch():
    m = pyebm.MLPEnergy(3, 2, hidden=(8,))
    res = pyebm.rerank(m, torch.randn(0, 3), torch.randn(0, 5, 2), k=2, temperature=1.0)
    assert res.index.shape == (0, 2) and res.states.shape == (0, 2, 2) and res.probs.shape == (0, 5)


@pytest.mark.gpu
def test_cuda_rerank_matches_cpu():
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(4, 3, hidden=(32, 32))
    x, y = torch.randn(5, 4), torch.randn(5, 300, 3)
    mask = torch.rand(5, 300) < 0.8
    cpu = pyebm.rerank(m, x, y, k=7, mask=mask, temperature=0.3)
    mc = m.to("cuda")
    gpu = pyebm.rerank(mc, x.cuda(), y.cuda(), k=7, mask=mask.cuda(), temperature=0.3)
    assert gpu.index.device.type == "cuda"
    torch.testing.assert_close(gpu.all_energy.cpu(), cpu.all_energy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.probs.cpu(), cpu.probs, atol=1e-4, rtol=1e-4)
    E = cpu.all_energy
    # the chosen energies are the k lowest valid ones (indices may differ only between near-equal energies)
    torch.testing.assert_close(gpu.energy.cpu(), torch.sort(E, 1).values[:, :7], atol=1e-4, rtol=1e-4)
