"""Triton kernels of pyebm, installed as the package pyebm._kernels. No torch.library code here."""
