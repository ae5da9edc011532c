"""y = x @ w^T (+ add): the product that ``pyebm::rows_linear`` computes for a few rows (EBT's prediction
rows and extended context tokens), in plain PyTorch."""
from typing import Optional

import torch


def rows_linear(x: torch.Tensor, w: torch.Tensor, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K], w [N, K], add [M, N] or None -> [M, N]."""
    y = x @ w.t()
    return y if add is None else add + y
