"""PyTorch reference implementations: the ground truth every backend is tested against.

Plain eager compositions (matmul → masked softmax → matmul) written for clarity, shipped in the package so tests,
benchmarks and users share one definition (as FlagAttention's ``flag_attn.testing``). ``upcast=True`` computes in
float64 for error budgets.

Masks: ``key_padding_mask`` / ``query_padding_mask`` are bool with ``True`` = padding. A query row whose keys are
all padding gets a zero output (never NaN); padded query rows get zero outputs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def masked_softmax(scores: Tensor, key_padding: Optional[Tensor]) -> Tensor:
    """Softmax over the last dim; ``key_padding`` broadcastable to ``scores``, True = excluded.

    Rows with every key excluded give all-zero probabilities (not NaN), with finite gradients.
    """
    if scores.shape[-1] == 0:  # an empty source: no probabilities at all
        return scores
    if key_padding is not None:
        scores = scores.masked_fill(key_padding, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom > 0, denom, torch.ones_like(denom))


def _prep(t: Tensor, upcast: bool) -> Tensor:
    return t.double() if upcast else t


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Optional[Tensor] = None,
    query_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    upcast: bool = False,
) -> Tensor:
    """softmax(q·kᵀ·scale, masked)·v.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), key_padding_mask (B, Lk), query_padding_mask (B, Lq)
    → (B, H, Lq, Dv) in q's dtype (computed in float64 when ``upcast``).
    """
    dtype = q.dtype
    q, k, v = _prep(q, upcast), _prep(k, upcast), _prep(v, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    kp = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    p = masked_softmax(scores, kp)
    if dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = torch.matmul(p, v)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[:, None, :, None], 0.0)
    return out if upcast else out.to(dtype)


def multi_source_attention_ref(
    q: Tensor,
    sources: Sequence[tuple[Tensor, Tensor, Optional[Tensor]]],
    scale: Optional[float] = None,
    query_padding_mask: Optional[Tensor] = None,
    upcast: bool = False,
) -> Tensor:
    """Σ_s softmax_s(q·k_sᵀ·scale, mask_s)·v_s: one softmax per source, outputs summed.

    q (B, H, Lq, D); sources = [(k_s (B, H, L_s, D), v_s (B, H, L_s, Dv), key_padding_mask_s (B, L_s) | None)]
    → (B, H, Lq, Dv).
    """
    out = None
    for k, v, mask in sources:
        o = attention_ref(q, k, v, key_padding_mask=mask, query_padding_mask=query_padding_mask, scale=scale,
                          upcast=upcast)
        out = o if out is None else out + o
    return out


def bottleneck_exchange_ref(
    queries: Sequence[Tensor],
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    query_padding_masks: Optional[Sequence[Optional[Tensor]]] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = False,
) -> list[Tensor]:
    """Each modality's tokens attend to the bottleneck tokens of their own sample.

    queries[m] (B, H, L_m, D); keys[m], values[m] (B, H, K, D) (the bottleneck projected by modality m's
    weights); key_padding_mask (B, K) shared by all modalities → [(B, H, L_m, D)].
    """
    qpm = query_padding_masks or [None] * len(queries)
    return [
        attention_ref(q, k, v, key_padding_mask=key_padding_mask, query_padding_mask=m, scale=scale, upcast=upcast)
        for q, k, v, m in zip(queries, keys, values, qpm)
    ]


def masked_mean_ref(x: Tensor, mask: Optional[Tensor] = None, upcast: bool = False) -> Tensor:
    """Mean of x (B, L, D) over the positions where mask (B, L) is True → (B, D); an empty row gives zeros."""
    dtype = x.dtype
    x = _prep(x, upcast)
    if mask is None:
        out = x.mean(dim=1)
    else:
        w = mask.to(x.dtype).unsqueeze(-1)
        out = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return out if upcast else out.to(dtype)
