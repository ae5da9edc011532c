"""Op layer: every fused op is a real ``torch.ops.pyebm.*`` op with a fake (meta) implementation.

The functions here validate arguments, choose the backend (``pyebm._backend.resolve``) and call the op.
"""
from pyebm.ops.mlp_energy import dispatch_floor, mlp_energy, mlp_energy_grad  # noqa: F401
# The EBT Triton ops register their torch.ops.pyebm.* schemas here; Triton itself loads on first call.
from pyebm.ops import ebt_attention, ebt_norm_swiglu, ebt_vocab  # noqa: F401,E402
