"""Discrete energies: exact and local argmins over sets and permutations, and Sinkhorn.

    pyebm.discrete.set_argmin(u, U=None, k=None)      sets y in {0,1}^L, E = -<u, y> (- 1/2 <y, U y>)
    pyebm.discrete.permutation_argmin(theta)          permutations, E = -<theta, y> or -<theta, P>
    pyebm.discrete.sinkhorn(theta, tau)               soft assignment (log-domain Sinkhorn)
    pyebm.discrete.set_energy, permutation_energy     the energies of given states (checked inputs)

Sign convention everywhere: scores u / theta are higher-is-better and the energy is their negation, so the
argmin maximises the score.
"""
from pyebm.discrete.permutations import PermutationResult, permutation_argmin, permutation_energy, sinkhorn
from pyebm.discrete.sets import SetResult, set_argmin, set_energy

__all__ = ["set_argmin", "set_energy", "SetResult", "permutation_argmin", "permutation_energy", "PermutationResult",
           "sinkhorn"]
