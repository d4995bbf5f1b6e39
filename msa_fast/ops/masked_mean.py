"""Mean over valid positions: ``masked_mean(x, mask)``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._core import MaskedMeanFn, check_float, check_mask


def masked_mean(x: Tensor, mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """x (B, L, D), mask (B, L) bool True = valid (None = all valid) → (B, D); rows without a valid position give 0."""
    check_float(x, "x", 3, "(B, L, D)")
    B, L, _ = x.shape
    if mask is None:
        valid = torch.ones(B, L, dtype=torch.bool, device=x.device)
    else:
        valid = check_mask(mask, "mask", (B, L), x.device, meaning="True = valid").contiguous()
    name = _dispatch.resolve(backend, x.device)
    return MaskedMeanFn.apply(x.contiguous(), valid, _dispatch.get("masked_mean", name))
