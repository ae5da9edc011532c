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
