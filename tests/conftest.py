import os

# Triton kernels run on CPU tensors in interpreter mode when there is no GPU. Triton reads the variable
# when a kernel is defined, so it is set before any test imports pyebm._kernels.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests (threads only add synchronisation there, and stall
    on a busy machine); the previous count afterwards. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=[pytest.param("cpu", id="interp", marks=pytest.mark.triton),
                        pytest.param("cuda", id="cuda", marks=[pytest.mark.triton, pytest.mark.gpu])])
def triton_device(request):
    """The device of a Triton test's tensors, one test per device.

    ``interp``: CPU tensors, kernels run by Triton's interpreter (TRITON_INTERPRET=1, which this file sets
    when there is no GPU). ``cuda``: CUDA tensors, kernels compiled for the GPU (marked ``gpu``: skipped
    without one). A process runs one of the two: Triton decides interpreted or compiled when a kernel is
    defined, from TRITON_INTERPRET.
    """
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if request.param == "cpu" and not interpreted:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1; this process compiles for the GPU")
    if request.param == "cuda" and interpreted:
        pytest.skip("TRITON_INTERPRET=1: this process interprets Triton kernels instead of compiling them")
    return torch.device(request.param)
