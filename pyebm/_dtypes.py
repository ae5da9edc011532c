"""dtypes by name, as pyebm writes them into configurations, server answers, benchmark rows and op arguments:
``name(torch.float32) == "float32"`` and back."""
from __future__ import annotations

from typing import Optional

import torch


def name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "", 1)


def named(text) -> Optional[torch.dtype]:
    """The dtype ``name`` gave ``text`` for, or None when ``text`` names none."""
    dtype = getattr(torch, text, None) if isinstance(text, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None
