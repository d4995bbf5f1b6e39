"""One query set over several key/value sources, one softmax per source, outputs summed (interim)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..testing.reference import multi_source_attention_ref


def multi_source_attention(q: Tensor, sources: Sequence[tuple[Tensor, Tensor, Optional[Tensor]]],
                           scale: Optional[float] = None, query_padding_mask: Optional[Tensor] = None,
                           backend: str = "auto") -> Tensor:
    """q (B,H,Lq,D); sources [(k_s (B,H,L_s,D), v_s, key_padding_mask_s (B,L_s)|None)] → (B,H,Lq,D)."""
    return multi_source_attention_ref(q, sources, scale, query_padding_mask)
