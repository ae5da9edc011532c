"""Training losses for energies.

    loss = pyebm.losses.joint_partition_loss(E_data, E_prior, tau)

``joint_partition_loss`` learns an energy together with its log-partition function, by stochastic
gradient descent and without MCMC (Sander, Roulet, Liu, Blondel, "Joint learning of energy-based models
and their partition function", ICML 2025). The paper writes a score g (higher = more likely) and the model

    p(y | x) = q(y | x) exp(g(x, y) - A(x)),   A(x) = log E_{y' ~ q(.|x)}[exp(g(x, y'))],

for a prior q that is easy to sample (e.g. uniform over the sets or permutations), and learns a second
network tau(x) with g by minimising

    E_x[ tau(x) + E_{y' ~ q(.|x)}[exp(g(x, y') - tau(x))] - 1 ] - E_{(x, y)}[ g(x, y) ].

pyebm energies are lower-is-better, so here g = -E:

    loss = E_{(x, y)}[ tau(x) + E_{y' ~ q(.|x)}[exp(-E(x, y') - tau(x))] - 1 + E(x, y) ].

For a fixed energy the minimising tau is exactly A(x) = log E_{y' ~ q}[exp(-E(x, y'))] (the derivative in
tau is 1 - E_q[exp(-E - tau)]), and the loss is then the negative log-likelihood of the data under
p(y | x) = q(y | x) exp(-E(x, y) - A(x)) (up to the constant E[log q(y | x)]). So the minimum over both
is maximum likelihood, and a trained pair gives normalised log-probabilities without sampling:

    log p(y | x) = log q(y | x) - E(x, y) - tau(x)

(for q uniform over N states: -E(x, y) - tau(x) - log N), e.g. to rank candidates with ``pyebm.rerank``.
Tested in ``tests/test_losses.py``: a hand-computed value, and recovery of the exact conditional
probabilities and log-partition on an enumerable problem (exact expectations, and SGD with sampled priors).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["joint_partition_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def joint_partition_loss(energy_data: Tensor, energy_prior: Tensor, log_partition: Tensor,
                         reduction: str = "mean") -> Tensor:
    """The joint energy / log-partition loss (see the module docstring), differentiable in all three inputs.

    energy_data    [N] E(x_n, y_n) of the observed pairs.
    energy_prior   [N, M] E(x_n, y'_nm) of M >= 1 samples y'_nm ~ q(. | x_n) from the prior, per pair (the
                   mean over them estimates E_q; all states of a uniform q, each once, make it exact).
    log_partition  [N] tau(x_n), the log-partition network's output for each pair's context.
    reduction      "mean" (default) or "sum" over the N pairs, or "none": the [N] per-pair losses
                   tau_n + mean_m exp(-E'_nm - tau_n) - 1 + E_n.
    """
    for name, t in (("energy_data", energy_data), ("energy_prior", energy_prior),
                    ("log_partition", log_partition)):
        if not isinstance(t, Tensor):
            raise TypeError(f"joint_partition_loss: {name} must be a tensor; got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"joint_partition_loss: {name} must be a floating tensor; got {t.dtype}")
    if energy_data.dim() != 1:
        raise ValueError(f"joint_partition_loss: energy_data must be [N]; got shape {list(energy_data.shape)}")
    N = energy_data.shape[0]
    if energy_prior.dim() != 2 or energy_prior.shape[0] != N or energy_prior.shape[1] < 1:
        raise ValueError(f"joint_partition_loss: energy_prior must be [N={N}, M] with M >= 1 prior samples per "
                         f"pair; got shape {list(energy_prior.shape)}")
    if tuple(log_partition.shape) != (N,):
        raise ValueError(f"joint_partition_loss: log_partition must be [N={N}] (tau of each pair's context); got "
                         f"shape {list(log_partition.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"joint_partition_loss: reduction must be one of {', '.join(_REDUCTIONS)}; got "
                         f"{reduction!r}")
    per_pair = (log_partition + torch.exp(-energy_prior - log_partition[:, None]).mean(1) - 1
                + energy_data)
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair
