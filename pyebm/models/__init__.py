"""Transformer energy models with cached context."""
from pyebm.models.ebt import EBT, EBTCache, EBTInference, ThinkResult
from pyebm.models.ebt_policy import EBTPolicy, EBTPolicyContext

__all__ = ["EBT", "EBTCache", "EBTInference", "ThinkResult", "EBTPolicy", "EBTPolicyContext"]
