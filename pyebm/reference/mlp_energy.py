"""Reference MLP energy: E(x, y) = w_out . h_L + b_out.

    h_1     = act(W_x x + W_y y + b_1)
    h_{l+1} = act(W_l h_l + b_l)  (+ h_l when ``residual`` and the widths match)

The context term ``c = W_x x + b_1`` is computed once per context (``mlp_context``); the candidate
functions take ``c`` [B, H1] and ``y`` [B, K, D].
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": lambda t: F.gelu(t, approximate="none"),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "tanh": torch.tanh,
    "softplus": F.softplus,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}") from None


def mlp_context(x: Optional[torch.Tensor], w_x: Optional[torch.Tensor], b_in: Optional[torch.Tensor],
                batch: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """c = x @ W_x^T + b_1 -> [B, H1]. ``w_x`` None means no context (context_dim 0)."""
    if w_x is not None and w_x.shape[1] > 0:
        # one call: ATen's linear of a 2-D input is addmm(b_1, x, W_x^T) (mm without a bias), autograd included
        return torch.nn.functional.linear(x, w_x, b_in)
    if b_in is not None:
        return b_in.expand(batch, width).clone()
    return like.new_zeros(batch, width)


def mlp_energy(ctx: torch.Tensor, y: torch.Tensor, w_in: torch.Tensor, weights: Sequence[torch.Tensor],
               biases: Sequence[torch.Tensor], w_out: torch.Tensor, b_out: torch.Tensor,
               activation: str = "silu", residual: bool = False) -> torch.Tensor:
    """E [B, K] for ctx [B, H1], y [B, K, D], w_in [H1, D], weights[l] [H_{l+1}, H_l], w_out [H_L]."""
    act = activation_fn(activation)
    h = act(ctx.unsqueeze(1) + y @ w_in.t())
    for w, b in zip(weights, biases):
        z = act(h @ w.t() + b)
        h = z + h if (residual and w.shape[0] == w.shape[1]) else z
    return h @ w_out.reshape(-1) + b_out.reshape(())


def mlp_energy_grad(ctx, y, w_in, weights, biases, w_out, b_out, activation="silu",
                    residual=False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(E [B, K], dE/dy [B, K, D]) by plain autograd; no gradients to the weights."""
    with torch.enable_grad():
        yy = y.detach().requires_grad_(True)
        E = mlp_energy(ctx.detach(), yy, w_in.detach(), [w.detach() for w in weights],
                       [b.detach() for b in biases], w_out.detach(), b_out.detach(), activation, residual)
        (G,) = torch.autograd.grad(E.sum(), yy)
    return E.detach(), G
