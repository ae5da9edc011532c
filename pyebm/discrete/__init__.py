"""Discrete energies: samplers on binary and one-hot categorical states.

    pyebm.discrete.gibbs_with_gradients(energy, x, init, steps)   Gibbs with gradients (one change per step)
    pyebm.discrete.dmala(energy, x, init, steps, step_size, mh)   discrete Langevin (DMALA; DULA with mh=False)
"""
from pyebm.discrete.samplers import SampleResult, dmala, gibbs_with_gradients

__all__ = ["SampleResult", "gibbs_with_gradients", "dmala"]
