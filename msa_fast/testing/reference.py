"""PyTorch reference implementations: the ground truth every backend is tested against.

Plain eager compositions (matmul → masked softmax → matmul) written for clarity, shipped in the package so tests,
benchmarks and users share one definition (as FlagAttention's ``flag_attn.testing``). ``upcast=True`` computes in
float64 for error budgets.

Masks: ``key_padding_mask`` / ``query_padding_mask`` are bool with ``True`` = padding; ``masked_mean_ref`` takes
``valid`` with ``True`` = valid (the public ``msa_fast.ops.masked_mean`` accepts either, by name). A query row whose
keys are all padding gets a zero output (never NaN); padded query rows get zero outputs.

Non-finite inputs (every backend reproduces these positions exactly, tests/test_ops_fuzz.py): a query row with a
NaN or +inf score on a valid key (NaN / inf in q or in a valid key's k) gets a NaN output row; a row whose valid
scores are all −inf gets zeros, like a fully padded row; the q of a padded query row and the k of a padded key never
matter. ``masked_mean_ref`` propagates NaN / inf at valid positions and ignores padded positions.
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
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """softmax(q·kᵀ·scale, masked)·v.

    q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv), key_padding_mask (B, Lk), query_padding_mask (B, Lq)
    → (B, H, Lq, Dv) in q's dtype (computed in float64 when ``upcast``). ``dropout_p`` > 0 drops probabilities with
    ``F.dropout``, or with the given keep mask (B, H, Lq, Lk) bool (e.g. ``dropout_keep_mask``, what the fused
    kernels draw), kept entries scaled by 1 / (1 − p).
    """
    dtype = q.dtype
    q, k, v = _prep(q, upcast), _prep(k, upcast), _prep(v, upcast)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    kp = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    p = masked_softmax(scores, kp)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
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


def masked_mean_ref(x: Tensor, valid: Optional[Tensor] = None, upcast: bool = False) -> Tensor:
    """Mean of x (B, L, D) over the positions where ``valid`` (B, L) bool is True (True = valid; None = all) →
    (B, D); a row without a valid position gives zeros. Padded positions are ignored whatever they hold (NaN / inf
    included); NaN / inf at a valid position propagate."""
    dtype = x.dtype
    x = _prep(x, upcast)
    if valid is None:
        out = x.mean(dim=1)
    else:
        w = valid.to(x.dtype).unsqueeze(-1)
        out = torch.where(valid.unsqueeze(-1), x, 0.0).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)
    return out if upcast else out.to(dtype)


# ---- counter-based dropout RNG (mirrors csrc/counter_rng.h and the Triton kernels bit for bit) ------------------
_M32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """(h · c) mod 2³² for int64 tensors holding uint32 values, without int64 overflow (16-bit split of c)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def counter_rng_bits(seed: int, counters: Tensor) -> Tensor:
    """32 random bits per element counter n (int64 tensor, n ≥ 0) → int64 tensor of values in [0, 2³²).

    bits(seed, n) = fmix32(fmix32(lo32(n) ^ lo32(seed)) ^ hi32(seed) ^ hi32(n)·0x9E3779B1), MurmurHash3's finaliser;
    the definition shared by the C++ (csrc/counter_rng.h) and Triton kernels."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    s0, s1 = seed & _M32, seed >> 32
    n = counters.to(torch.int64)
    hi_w = _mul32(n >> 32, 0x9E3779B1) ^ s1
    return _fmix32(_fmix32((n & _M32) ^ s0) ^ hi_w)


def dropout_keep_threshold(p: float) -> int:
    """floor(p·2³²) (capped at 2³²−1): element n is kept iff bits(seed, n) ≥ threshold."""
    return min(int(p * 2**32), _M32)


def dropout_keep_mask(seed: int, shape: Sequence[int], p: float, device: Optional[torch.device] = None) -> Tensor:
    """The keep mask (bool, ``shape``) the fused kernels draw for a contiguous tensor of ``shape``: element with
    row-major flat index n is kept iff counter_rng_bits(seed, n) ≥ floor(p·2³²). p = 1 drops everything."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if p >= 1.0:
        return torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    n = torch.arange(numel, dtype=torch.int64, device=device)
    return (counter_rng_bits(seed, n) >= dropout_keep_threshold(p)).reshape(tuple(shape))


# ---- expert mixture (MIDG's Mixture of Invariant Experts) --------------------------------------------------------
def _expert_act(z: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return torch.nn.functional.gelu(z)  # exact (erf) GELU
    if activation == "relu":
        return torch.relu(z)
    raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")


def expert_ffn_ref(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, e: int,
                   activation: str = "gelu") -> Tensor:
    """Expert ``e``'s FFN on x (N, d): act(x @ w1[e] + b1[e]) @ w2[e] + b2[e] → (N, d)."""
    return _expert_act(x @ w1[e] + b1[e], activation) @ w2[e] + b2[e]


def expert_mixture_ref(x: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                       activation: str = "gelu", upcast: bool = False) -> Tensor:
    """Dense mixture of E expert FFNs: out[n] = Σ_e gates[n, e] · (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e]).

    x (N, d), gates (N, E), w1 (E, d, h), b1 (E, h), w2 (E, h, d), b2 (E, d) → (N, d) in x's dtype (float64 when
    ``upcast``). A plain loop over the experts, written for clarity."""
    dtype = x.dtype
    x, gates, w1, b1, w2, b2 = (_prep(t, upcast) for t in (x, gates, w1, b1, w2, b2))
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        out = out + gates[:, e:e + 1] * expert_ffn_ref(x, w1, b1, w2, b2, e, activation)
    return out if upcast else out.to(dtype)


def expert_mixture_topk_ref(x: Tensor, expert_idx: Tensor, expert_weight: Tensor, w1: Tensor, b1: Tensor,
                            w2: Tensor, b2: Tensor, activation: str = "gelu", upcast: bool = False) -> Tensor:
    """Top-k routed mixture: out[n] = Σ_j expert_weight[n, j] · FFN_{expert_idx[n, j]}(x[n]).

    expert_idx (N, k) integer in [0, E), expert_weight (N, k); other shapes as ``expert_mixture_ref``. Each expert
    runs on every token here and the result is selected per slot (clarity over speed)."""
    dtype = x.dtype
    x, expert_weight, w1, b1, w2, b2 = (_prep(t, upcast) for t in (x, expert_weight, w1, b1, w2, b2))
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        sel = (expert_idx == e).to(x.dtype) * expert_weight  # (N, k): weight of expert e in each slot
        out = out + sel.sum(1, keepdim=True) * expert_ffn_ref(x, w1, b1, w2, b2, e, activation)
    return out if upcast else out.to(dtype)
