"""pyebm._state: the snapshot that decides whether a pack is still the module's current weights, in C++
(pyebm._C.Snapshot) and in Python (the fallback without the extension), and the packed-state helpers."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pyebm
from pyebm import _state

SNAPSHOTS = [pytest.param(_state._PySnapshot, id="python")]
if pyebm.backends()["cpu"]:
    SNAPSHOTS.append(pytest.param(pyebm._backend.ext().Snapshot, id="cpp"))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.blocks = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 2)])
        self.register_buffer("scale", torch.ones(2))


NAMES = ["a.weight", "a.bias", None, "blocks.1.weight", "scale"]


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


class Packed(_state.PackedModule):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2)


@pytest.mark.parametrize("Snapshot", SNAPSHOTS)
def test_snapshot_sees_every_kind_of_change(Snapshot):
    net = Net()
    snap = Snapshot(net, NAMES)
    assert len(snap) == 5 and snap.tensors[2] is None
    assert all(not t.requires_grad for t in snap.tensors if t is not None)  # detached aliases
    assert snap.tensors[0].data_ptr() == net.a.weight.data_ptr()
    assert snap.unchanged()

    def changed_by(fn, versions=True):
        s = snap.again()
        assert s.unchanged()
        fn()
        return not s.unchanged(versions=versions)

    with torch.no_grad():
        assert changed_by(lambda: net.a.weight.add_(1))                       # in place
        assert not changed_by(lambda: net.a.weight.add_(1), versions=False)   # ... same storage for a CUDA graph
        assert changed_by(lambda: net.blocks[1].weight[0].mul_(2))            # through a view
        assert changed_by(lambda: net.scale.copy_(torch.full((2,), 3.0)))     # a buffer
    assert changed_by(lambda: setattr(net.a.weight, "data", torch.randn(3, 4)))           # .data =
    assert changed_by(lambda: setattr(net.a.weight, "data", net.a.weight.data.t().contiguous().t()))  # layout
    assert changed_by(lambda: setattr(net.a, "bias", nn.Parameter(torch.randn(3))))      # a new parameter
    assert changed_by(lambda: net.blocks.__setitem__(1, nn.Linear(3, 2)))                 # a new submodule
    assert changed_by(lambda: parametrize.register_parametrization(net.a, "weight", Double()))
    s = snap.again()
    assert not s.unchanged()  # a parametrization computes a new tensor at every access
    with parametrize.cached():
        s = snap.again()
        assert s.unchanged()
    parametrize.remove_parametrizations(net.a, "weight")
    assert changed_by(lambda: net.double())  # moved
    # writes that bypass the version counter are not seen (autograd does not see them either)
    s = snap.again()
    net.blocks[1].weight.data.mul_(2)
    assert s.unchanged()


@pytest.mark.parametrize("Snapshot", SNAPSHOTS)
def test_snapshot_of_inference_tensors_is_never_unchanged(Snapshot):
    with torch.inference_mode():
        net = Net()
    snap = Snapshot(net, NAMES)
    assert not snap.unchanged() and snap.unchanged(versions=False)


@pytest.mark.parametrize("Snapshot", SNAPSHOTS)
def test_snapshot_errors(Snapshot):
    net = Net()
    with pytest.raises(AttributeError):
        Snapshot(net, ["a.nothing"])
    with pytest.raises(TypeError, match="not a tensor"):
        Snapshot(net, ["a"])
    snap = Snapshot(net, ["a.weight"])
    del net
    with pytest.raises(ValueError, match="no longer exists"):
        snap.unchanged()


def test_packed_state_is_rebuilt_on_change_and_never_copied():
    net = Net()
    builds = []

    def build(ts):
        builds.append(1)
        return ts[0] * 2

    first = _state.packed(net, "k", lambda: ["a.weight"], build)
    assert torch.equal(_state.packed(net, "k", lambda: ["a.weight"], build), first) and len(builds) == 1
    with torch.no_grad():
        net.a.weight.add_(1)
    again = _state.packed(net, "k", lambda: ["a.weight"], build)
    assert len(builds) == 2 and torch.equal(again, net.a.weight.detach() * 2)

    m = Packed()
    _state.packed(m, "k", lambda: ["a.weight"], build)
    assert "k" in m._pyebm_packed
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin._pyebm_packed == {}
    m.double()
    assert m._pyebm_packed == {}
    _state.packed(m, "k", lambda: ["a.weight"], build)
    pyebm.repack(m)
    assert m._pyebm_packed == {}


def test_packs_current_sees_in_place_writes_that_keep_every_address():
    """What a captured CUDA graph reading packs checks before a replay (minimize / EnergyPolicy cuda_graph)."""
    outer = torch.nn.Sequential(Net())  # packs on a submodule count
    inner = outer[0]
    assert _state.packs_current(outer)  # no packs yet
    _state.packed(inner, "k", lambda: ["a.weight"], lambda ts: ts[0] * 2)
    snap = _state.Snapshot(outer, [n for n, _ in outer.named_parameters()])
    assert _state.packs_current(outer)
    with torch.no_grad():
        inner.a.weight.add_(1)  # an optimizer step: same storage, new version
    assert snap.unchanged(versions=False)  # the addresses a graph reads are the same...
    assert not _state.packs_current(outer)  # ...but the pack it reads is stale
    _state.packed(inner, "k", lambda: ["a.weight"], lambda ts: ts[0] * 2)
    assert _state.packs_current(outer)
    py = _state._PySnapshot(inner, ["a.weight"])
    inner.__dict__[_state.ATTR]["py"] = (py, None)  # the pure-Python snapshot counts too
    assert _state.packs_current(outer)
    with torch.no_grad():
        inner.a.weight.mul_(2)
    assert not _state.packs_current(outer)
