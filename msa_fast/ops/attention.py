"""Cross-modal attention with key padding (interim: reference-backed; backends land next)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..testing.reference import attention_ref


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              k_lengths: Optional[Tensor] = None, query_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """q (B,H,Lq,D), k/v (B,H,Lk,D), key_padding_mask (B,Lk) bool True=pad or k_lengths (B,) → (B,H,Lq,D)."""
    if k_lengths is not None:
        import torch
        key_padding_mask = torch.arange(k.shape[2], device=k.device)[None] >= k_lengths[:, None]
    return attention_ref(q, k, v, key_padding_mask, query_padding_mask, scale, dropout_p)
