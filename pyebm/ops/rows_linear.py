"""``torch.ops.pyebm.rows_linear``: y [M, N] = x [M, K] @ w [N, K]^T (+ add [M, N]) for a few rows.

The products of EBT's prediction rows (G samples of a descent step) and of an extended context token: a
handful of rows against a weight of a few hundred thousand to a few million elements, read in its own row
layout. A BLAS call for such a product streams the weight at a fraction of the memory bandwidth; the kernel
(csrc/cpu/rows_linear.h) keeps every (row, weight row) dot product of a tile in registers and streams the
weight rows once. float32 runs the kernel (AVX-512, AVX2+FMA or baseline, ``PYEBM_CPU_ISA``), float64
ATen's addmm. An inference op (no autograd formula). Whether EBT calls it is decided by
``pyebm._dispatch.ebt_rows_refusal``; the reference is ``pyebm.reference.rows_linear``.
"""
from typing import Optional

import torch


def rows_linear(x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K], w [N, K], add [M, N] or None -> x @ w^T (+ add) [M, N], CPU float32/float64."""
    return torch.ops.pyebm.rows_linear(x, w, add)
