"""Transformer energy models with cached context."""
from pyebm.models.ebt import EBT, EBTCache, ThinkResult

__all__ = ["EBT", "EBTCache", "ThinkResult"]
