"""minimize(..., cuda_graph=True): the captured per-step loop replays the same numbers as the eager path."""
import pytest
import torch

import pyebm
from pyebm import Descent, minimize


def test_cuda_graph_needs_cuda_tensors_and_no_generator():
    m = pyebm.MLPEnergy(3, 2, hidden=(8,))
    with pytest.raises(ValueError, match="cuda_graph=True needs the context as a CUDA tensor"):
        minimize(m, torch.randn(2, 3), candidates=4, cuda_graph=True)


@pytest.mark.gpu
def test_cuda_graph_replays_the_per_step_path():
    torch.manual_seed(0)
    m = pyebm.MLPEnergy(5, 3, hidden=(32, 32), activation="tanh").cuda()
    cfg = Descent.gd(steps=6, step_size=0.05, momentum=0.5, lower=-1.0, upper=1.0, tol=1e-3)
    for trial in range(3):  # capture on the first call, replay with new inputs after
        x = torch.randn(4, 5, device="cuda")
        y0 = torch.randn(4, 7, 3, device="cuda")
        a = minimize(m, x, candidates=7, config=cfg, init=y0, whole_loop=False)
        b = minimize(m, x, candidates=7, config=cfg, init=y0, cuda_graph=True)
        torch.testing.assert_close(b.y, a.y)
        torch.testing.assert_close(b.energy, a.energy)
        assert torch.equal(b.steps, a.steps) and torch.equal(b.status, a.status)


@pytest.mark.gpu
def test_cuda_graph_generic_module_energy():
    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x, y):
            return ((self.lin(y) - x.unsqueeze(1)) ** 2).sum(-1)

    f = Quadratic().cuda()
    x = torch.randn(3, 4, device="cuda")
    y0 = torch.randn(3, 5, 4, device="cuda")
    cfg = Descent.gd(steps=5, step_size=0.05)
    a = minimize(f, x, candidates=5, config=cfg, init=y0, whole_loop=False)
    b = minimize(f, x, candidates=5, config=cfg, init=y0, cuda_graph=True)
    torch.testing.assert_close(b.y, a.y)
    with pytest.raises(ValueError, match="generator=None"):
        minimize(f, x, candidates=5, config=cfg, init=y0, cuda_graph=True, generator=1)


def test_policy_cuda_graph_errors_on_cpu():
    from pyebm.models import EBTPolicy
    from pyebm.policies import EnergyPolicy

    net = EBTPolicy(action_dim=3, horizon=6, embed_dim=16, layers=1, heads=2)
    pol = EnergyPolicy.ebt_policy(net, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA observations"):
        pol.act(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="cuda_graph=True captures one act"):
        EnergyPolicy.ebt_policy(net, cuda_graph=True, recovery_threshold=1.0)
    with pytest.raises(ValueError, match="cuda_graph=True captures one act"):
        EnergyPolicy.ebt_policy(net, cuda_graph=True, warm_start=True)
    assert pickle_round_trip(pol).cuda_graph


def pickle_round_trip(obj):
    import pickle

    return pickle.loads(pickle.dumps(obj))


@pytest.mark.gpu
@pytest.mark.parametrize("K", [1, 8])
def test_policy_act_cuda_graph_replays_eager_act(K):
    from pyebm.models import EBTPolicy
    from pyebm.policies import EnergyPolicy

    torch.manual_seed(0)
    net = EBTPolicy(action_dim=7, horizon=16, embed_dim=64, layers=2, heads=4).cuda()
    eager = EnergyPolicy.ebt_policy(net, candidates=K, max_steps=4, bounds=(-1.0, 1.0))
    graphed = EnergyPolicy.ebt_policy(net, candidates=K, max_steps=4, bounds=(-1.0, 1.0), cuda_graph=True)
    for trial in range(3):  # capture on the first call, replay with new inputs after
        obs = torch.randn(2, 4, 64, device="cuda")
        init = torch.randn(2, K, 16, 7, device="cuda")
        a = eager.act(obs, init=init)
        b = graphed.act(obs, init=init)
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(graphed.last_result.y, eager.last_result.y)
        assert torch.equal(graphed.last_result.steps, eager.last_result.steps)
    with torch.no_grad():  # in-place weight updates are read by the replayed graph
        net.head.fc2.weight.mul_(1.5)
    torch.testing.assert_close(graphed.act(obs, init=init), eager.act(obs, init=init))
    net.head.fc2.weight.data = net.head.fc2.weight.data * 0.5  # new storage: a new capture
    torch.testing.assert_close(graphed.act(obs, init=init), eager.act(obs, init=init))
