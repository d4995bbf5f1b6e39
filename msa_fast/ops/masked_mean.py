"""Mean over valid positions: ``masked_mean(x, valid)`` or ``masked_mean(x, key_padding_mask=padding)``.

Mask conventions are spelled out by the keyword: ``valid`` is True at the positions to average (True = valid),
``key_padding_mask`` is True at the positions to skip (True = padding, the convention of the attention ops). The old
keyword ``mask=`` (True = valid) said neither and is refused with a TypeError; positional use
``masked_mean(x, valid)`` is unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _dispatch
from ._core import MaskedMeanFn, check_float

_VALID_DOC = "bool, True = valid position"
_PADDING_DOC = "bool, True = padding"


def _check_bool_mask(mask, name: str, meaning: str, shape: tuple, device: torch.device) -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape} ({meaning}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        # A 0/1 integer or float mask does not say which convention it follows: refuse it rather than guess.
        raise TypeError(f"{name} must be a bool tensor ({meaning}), got {mask.dtype}: a 0/1 mask does not say "
                        f"which convention it follows; pass m.bool() as valid= if 1 marks the positions to average, "
                        f"or as key_padding_mask= if 1 marks padding")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but x is on {device}")
    return mask


def masked_mean(x: Tensor, valid: Optional[Tensor] = None, *, key_padding_mask: Optional[Tensor] = None,
                backend: str = "auto", **removed) -> Tensor:
    """Mean of x over its valid positions.

    x (B, L, D); give at most one mask, by name:
    - ``valid`` (B, L) bool, **True = valid** (averaged) — also the second positional argument;
    - ``key_padding_mask`` (B, L) bool, **True = padding** (skipped), as ``attention`` / ``multi_source_attention``;
    - neither: every position is valid.
    → (B, D). A row without a valid position (e.g. a fully missing modality) gives zeros, never NaN; NaN / inf at a
    valid position propagate, padded positions are ignored whatever they hold (``testing.reference.masked_mean_ref``).

    Errors (no value-based guessing: an all-padding row is legitimate, so an inverted bool mask cannot be told
    apart from real data): the removed keyword ``mask=`` → TypeError naming ``valid=`` / ``key_padding_mask=``;
    both masks given → TypeError; a non-bool mask (0/1 ints or floats, which carry no convention) → TypeError naming
    the convention of the keyword it was passed as; wrong shape / device → ValueError.
    """
    if removed:
        if "mask" in removed:
            raise TypeError("masked_mean() no longer takes mask= (its True meant 'valid', unlike the attention ops' "
                            "masks): pass valid= (bool, True = valid position, also positional) or "
                            "key_padding_mask= (bool, True = padding)")
        raise TypeError(f"masked_mean() got unexpected keyword argument(s) {', '.join(sorted(removed))}")
    check_float(x, "x", 3, "(B, L, D)")
    B, L, _ = x.shape
    if valid is not None and key_padding_mask is not None:
        raise TypeError("masked_mean() takes valid= (True = valid) or key_padding_mask= (True = padding), not both")
    if valid is not None:
        valid = _check_bool_mask(valid, "valid", _VALID_DOC, (B, L), x.device).contiguous()
    elif key_padding_mask is not None:
        valid = (~_check_bool_mask(key_padding_mask, "key_padding_mask", _PADDING_DOC, (B, L), x.device)).contiguous()
    else:
        valid = torch.ones(B, L, dtype=torch.bool, device=x.device)
    name = _dispatch.resolve(backend, x.device)
    return MaskedMeanFn.apply(x.contiguous(), valid, _dispatch.get("masked_mean", name))
