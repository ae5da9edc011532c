"""pyebm: fused kernels for energy-based model inference on PyTorch.

    pyebm.backends()                         which backends are usable here, and why not
    pyebm.MLPEnergy(...)                     MLP energy with cached context and a fused energy+gradient op
    pyebm.minimize(energy, x, K, Descent())  batched multi-candidate descent (DescentResult)
    pyebm.rerank(energy, x, proposals, k)    score / refine externally proposed candidates, keep the best k
    pyebm.explain(energy, x, config=..., K)  which path a call takes, and why not a faster one
    pyebm.DataConsistency(energy, A=, b=)    an energy plus a data-consistency term (inverse problems)
    pyebm.models.EBT, pyebm.models.EBTPolicy transformer energies with cached context
    pyebm.policies.EnergyPolicy              act() for energy policies (EBT-Policy, IBC)
    pyebm.discrete                           exact and local argmins over sets and permutations, Sinkhorn
    pyebm.distributed.minimize(...)          the K candidates split across torch.distributed ranks
    pyebm.adapter.PolicyAdapter              select_action() / reset() with an action queue and normalisation
    pyebm.serving.build_app(dir)             a Ray Serve app batching HTTP requests into act() or minimize()
    model.save_pretrained(dir)               weights (safetensors) + configuration (JSON); Class.from_pretrained(dir)
    pyebm.discrete.gibbs_with_gradients, dmala  samplers on binary / one-hot states
    pyebm.losses.joint_partition_loss        train an energy with its log-partition (no MCMC)
    pyebm.export(fn, inputs, "m.pt2")        an AOTInductor package of a whole inference call; pyebm.load runs it
    torch.ops.pyebm.*                        the fused ops
"""
from pyebm._version import __version__
from pyebm import _source_tree

_source_tree.install_finder()  # kernels/ as pyebm._kernels in a checkout used in place (no install)

from pyebm._backend import backends
from pyebm import ops, reference
from pyebm.energy import MLPEnergy
from pyebm.config import Descent
from pyebm.descent import DescentResult, minimize
from pyebm.rerank import RerankResult, rerank
from pyebm.inverse import DataConsistency
from pyebm.explain import Explanation, explain
from pyebm._state import repack
from pyebm import adapter, discrete, distributed, losses, models, policies, pretrained, protocol, serving
from pyebm._export import export, load

__all__ = ["__version__", "backends", "ops", "reference", "MLPEnergy", "Descent", "DescentResult", "minimize",
           "rerank", "RerankResult", "DataConsistency", "explain", "Explanation", "repack", "models", "policies",
           "protocol", "discrete", "distributed", "losses", "pretrained", "adapter", "serving", "export",
           "load"]
