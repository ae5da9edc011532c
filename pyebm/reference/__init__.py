"""Plain-PyTorch versions of every pyebm op and algorithm.

These are the ground truth for the tests and the "eager" column of the benchmarks: slow and obvious on
purpose. Nothing here may import the compiled extension or Triton. One module per op, named like the op
(``pyebm.reference.mlp_energy.mlp_energy_grad``).
"""
from pyebm.reference import descent, ebt, ebt_policy, mlp_energy, rows_linear  # noqa: F401
