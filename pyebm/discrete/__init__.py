"""Discrete energies: exact and local argmins over sets and permutations, Sinkhorn, and samplers.

    pyebm.discrete.set_argmin(u, U=None, k=None)      sets y in {0,1}^L, E = -<u, y> (- 1/2 <y, U y>)
    pyebm.discrete.permutation_argmin(theta)          permutations, E = -<theta, y> or -<theta, P>
    pyebm.discrete.sinkhorn(theta, tau)               soft assignment (log-domain Sinkhorn)
    pyebm.discrete.set_energy, permutation_energy     the energies of given states (checked inputs)
    pyebm.discrete.gibbs_with_gradients(energy, x, init, steps)   Gibbs with gradients (one change per step)
    pyebm.discrete.dmala(energy, x, init, steps, step_size, mh)   discrete Langevin (DMALA; DULA with mh=False)

Sign convention of the argmins: scores u / theta are higher-is-better and the energy is their negation, so
the argmin maximises the score. The samplers draw from p(y) proportional to exp(-E(x, y) / temperature).
"""
from pyebm.discrete.permutations import PermutationResult, permutation_argmin, permutation_energy, sinkhorn
from pyebm.discrete.samplers import SampleResult, dmala, gibbs_with_gradients
from pyebm.discrete.sets import SetResult, set_argmin, set_energy

__all__ = ["SetResult", "set_argmin", "set_energy", "PermutationResult", "permutation_argmin",
           "permutation_energy", "sinkhorn", "SampleResult", "gibbs_with_gradients", "dmala"]
