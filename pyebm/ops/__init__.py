"""Op layer: every fused op is a real ``torch.ops.pyebm.*`` op with a fake (meta) implementation.

Where things live: the C++ schemas in csrc/ops.cpp (the pure-Python install defines the MLP-energy ones in
``_fallback``); every argument check in ``_checks`` (mirroring csrc/cpu/op_checks.h); every fake in ``_fake``;
the backward of the differentiable ops in ``_autograd``. The other modules validate arguments, choose the
backend (``pyebm._backend.resolve``) and call the op; the Triton custom ops are defined next to their launchers.
"""
from pyebm import _backend

# pyebm._C refuses to load when PYEBM_CPU_ISA asks for an instruction set this CPU lacks (or misspells one).
# That is a configuration error, not a missing build: say so rather than fall back to the torch backend.
_why = str(_backend.ext_info().get("why") or "")
if _backend.ext() is None and "PYEBM_CPU_ISA" in _why:
    raise ValueError(_why[_why.find("pyebm: PYEBM_CPU_ISA"):-1])  # without the ")" of "not built (...)"

from pyebm.ops import _fallback  # noqa: F401,E402  (first: the ops of the pure-Python install)
from pyebm.ops import _autograd  # noqa: F401,E402  (the VJP ops' implementations)
from pyebm.ops import _fake  # noqa: F401,E402  (every fake; imports the Triton op modules)
from pyebm.ops.mlp_energy import dispatch_floor, mlp_energy, mlp_energy_grad  # noqa: F401,E402
from pyebm.ops import ebt_attention, ebt_norm_swiglu, ebt_vocab  # noqa: F401,E402
