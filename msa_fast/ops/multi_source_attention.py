"""One query set over several key/value sources, one softmax per source, outputs summed — in one launch.

Sources are concatenated along the key axis and delimited by offsets, so the segmented kernel handles all of them
in one pass (DashFusion temporal alignment / Multi_CA, LNLN hyper-modality layer, MBT/HBF bottleneck gathering).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _dispatch
from ._core import SegmentedAttentionFn, check_float, check_mask, check_same, check_scale, offsets_of, valid_or_none

Source = tuple[Tensor, Tensor, Optional[Tensor]]

#: "auto" on CPU routes inference calls (no gradient needed) with a head dim below SDPA_SMALL_HEAD_DIM_BELOW to torch
#: SDPA (one call per source) instead of the C++ kernel. Those head dims run the C++ kernel's generic P·V / dK·dV
#: loops; D = 12 (HME), 16, 32 and 64 have register-blocked vector loops, and with them the C++ kernel measured equal
#: or faster than SDPA (MOSI shapes, text over 501 vision / 376 + 501 keys, 2 threads, interleaved, paired, SDPA/C++:
#: D 16 single source 1.10 fwd / 1.21 fwd+bwd unmasked, 1.39 / 1.57 masked; two sources 0.95 / 1.09 unmasked,
#: 1.09 / 1.36 masked; D 12 single source unmasked over 501 keys 1.04 / 1.39, over 256 keys 1.46 / 1.72). Before those
#: loops D 12 and 16 went to SDPA too (SDPA was 10-40 % faster then).
SDPA_SMALL_HEAD_DIM_BELOW = 12

#: ... and every call (training too, any head dim, masked or not) with at least this many query rows and keys: on long
#: self-attention torch's CPU flash kernel measured faster fwd+bwd than the C++ kernel (2 threads, quiet machine:
#: D 64 / L 508 / B 16: 1.2-2.3x; D 16 / L 501: 1.1-1.6x; D 32 / L 501: 0.97-1.09x), while short query sets
#: (text 50, bottleneck 8 rows) and short key sets (501 tokens attending to 8 bottleneck tokens: 1.25x slower in
#: a DashFusion step) stay on the C++ kernel (equal or faster). Dropout never goes to SDPA: its CPU
#: dropout falls back to the math path (7x slower than the C++ in-kernel dropout at DashFusion's encoder shape).
SDPA_MIN_QUERY_ROWS = 256


#: ... and multi-source calls with head dim >= SDPA_MULTI_SOURCE_MIN_HEAD_DIM in every mode: measured (quiet machine,
#: MOSI shapes, 2 threads, providers interleaved, paired ratios; msa-fast bench ops --full) SDPA / C++ = 0.60-0.78
#: at D 64, masked or not, forward and forward+backward, where single-source D 64 calls are even (0.85-1.03).
SDPA_MULTI_SOURCE_MIN_HEAD_DIM = 64

#: ... and the small-head-dim rule (inference, or training without masks, at D < SDPA_SMALL_HEAD_DIM_BELOW) only when a
#: source has at least this many keys: measured (quiet machine, 2 threads, B 16, H 8, 50 query rows, unmasked,
#: paired) SDPA / C++ = 1.3-1.9 with 50-128 keys (D 12 / 16, fwd and fwd+bwd: C++ faster, e.g. HME's 50-token MulT
#: self-attention at D 12: 1.16 vs 2.2 ms fwd+bwd), 0.81-1.0 from 256 keys on (SDPA equal or faster).
SDPA_SMALL_HEAD_DIM_MIN_KEYS = 256


def sdpa_route_applies(backend: str, name: str, q: Tensor, tensors: Sequence[Tensor], unmasked: bool = False,
                       n_sources: int = 1) -> bool:
    """True when a plain backend="auto" (no use_backend / env override) picked the C++ backend for an fp32/fp64
    call where SDPA measured faster: long query and key sets (``SDPA_MIN_QUERY_ROWS``); several sources at a large
    head dim (``SDPA_MULTI_SOURCE_MIN_HEAD_DIM``); with a small head dim and a long key set
    (``SDPA_SMALL_HEAD_DIM_MIN_KEYS``) and a head dim below ``SDPA_SMALL_HEAD_DIM_BELOW``, inference calls and
    training calls without any mask. ``tensors`` = [q, k_1, v_1, ...]. Callers never route dropout here."""
    if backend != "auto" or name != "cpp" or _dispatch._override() is not None:
        return False
    if q.dtype not in (torch.float32, torch.float64):
        return False
    if min(t.shape[2] for t in tensors) >= SDPA_MIN_QUERY_ROWS:  # long queries and long key sets
        return True
    if n_sources > 1 and q.shape[-1] >= SDPA_MULTI_SOURCE_MIN_HEAD_DIM:
        return True
    if not 0 < q.shape[-1] < SDPA_SMALL_HEAD_DIM_BELOW or max(t.shape[2] for t in tensors[1:]) < SDPA_SMALL_HEAD_DIM_MIN_KEYS:
        return False
    return unmasked or not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def run_sdpa(q: Tensor, sources: Sequence[Source], scale: float, query_padding_mask: Optional[Tensor]) -> Tensor:
    """Σ_s SDPA(q, k_s, v_s, mask_s); torch >= 2.5 returns zeros (and finite grads) for fully masked rows on CPU.

    Finite inputs (checked with one reduction per tensor) take plain SDPA per source. Non-finite inputs follow the
    reference with device-side fix-ups (elementwise passes over q and k): SDPA adds the mask to the scores, so a padded key's k is zeroed first (a NaN there would poison every
    row); SDPA's CPU kernel returns zeros for a row whose scores are all NaN, so rows with a NaN in q (and a valid
    key) or whose (batch, head) has a NaN in a valid key's k are set to NaN; rows of a fully padded sample are set
    to zero. NaN anywhere in q / k then matches the reference exactly. Not covered: ±inf in q meeting padded keys
    (inf · 0 on the masked lanes gives NaN where the reference may give a finite row) and rows whose scores are
    all ±inf; the C++ / Triton / torch backends follow the reference in every case.
    """
    if _all_finite(q, *(k for k, _, _ in sources)):
        return _run_sdpa_finite(q, sources, scale, query_padding_mask)
    out = None
    q_nan = None
    for k, v, m in sources:
        if k.shape[2] == 0:
            continue
        if q_nan is None:
            q_nan = torch.isnan(q).any(dim=-1)  # (B, H, Lq)
        k_nan = torch.isnan(k).any(dim=-1)  # (B, H, L_s)
        mask = None
        if m is None:
            poison = q_nan | k_nan.any(dim=-1, keepdim=True)
        else:
            mask = ~m[:, None, None, :]
            k = k.masked_fill(m[:, None, :, None], 0.0)
            has_key = (~m).any(dim=1)[:, None, None]  # (B, 1, 1)
            poison = (q_nan & has_key) | (k_nan & ~m[:, None, :]).any(dim=-1, keepdim=True)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if m is not None:
            o = o.masked_fill(~has_key[..., None], 0.0)
        o = o.masked_fill(poison[..., None], float("nan"))
        out = o if out is None else out + o
    return _finish(out, q, query_padding_mask)


def _finish(out: Optional[Tensor], q: Tensor, query_padding_mask: Optional[Tensor]) -> Tensor:
    """The sum over sources (zeros when every source is empty, still in the graph), padded query rows zeroed."""
    if out is None:
        out = torch.where(torch.zeros_like(q, dtype=torch.bool), q, 0.0)  # keeps the graph (zero grads, no NaN)
    if query_padding_mask is not None:
        out = out.masked_fill(query_padding_mask[:, None, :, None], 0.0)
    return out


def _all_finite(*tensors: Tensor) -> bool:
    """True when no tensor holds NaN / ±inf: one reduction each (a sum is finite only then, or when it overflows,
    which merely takes the careful path). The SDPA route runs on CPU tensors, where reading the flag is free."""
    return all(t.numel() == 0 or bool(torch.isfinite(t.detach().sum(dtype=torch.float32))) for t in tensors)


def _run_sdpa_finite(q: Tensor, sources: Sequence[Source], scale: float,
                     query_padding_mask: Optional[Tensor]) -> Tensor:
    """``run_sdpa`` for finite inputs: SDPA per source, only rows of fully padded samples zeroed (measured: the
    non-finite fix-up passes cost 2–6× the SDPA kernel itself at MOSI shapes, D = 16)."""
    out = None
    for k, v, m in sources:
        if k.shape[2] == 0:
            continue
        mask = None if m is None else ~m[:, None, None, :]
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        if m is not None:
            empty = m.all(dim=1)  # (B,) samples without a valid key: the reference gives zero rows
            o = o.masked_fill(empty[:, None, None, None], 0.0)
        out = o if out is None else out + o
    return _finish(out, q, query_padding_mask)


def run_segmented(q: Tensor, sources: Sequence[Source], scale: float, query_padding_mask: Optional[Tensor],
                  name: str, dropout: Optional[tuple[float, int]] = None) -> Tensor:
    """Validated inputs → SegmentedAttentionFn on concrete backend ``name`` (``dropout`` = (p, seed) or None)."""
    B = q.shape[0]
    ks = [k for k, _, _ in sources]
    vs = [v for _, v, _ in sources]
    valid = [torch.ones(B, k.shape[2], dtype=torch.bool, device=q.device) if m is None else ~m
             for k, _, m in sources]
    offsets = offsets_of([k.shape[2] for k in ks])
    k = (ks[0] if len(ks) == 1 else torch.cat(ks, dim=2)).contiguous()
    v = (vs[0] if len(vs) == 1 else torch.cat(vs, dim=2)).contiguous()
    key_valid = (valid[0] if len(valid) == 1 else torch.cat(valid, dim=1)).contiguous()
    impl = _dispatch.get("attention", name)
    return SegmentedAttentionFn.apply(q.contiguous(), k, v, key_valid, valid_or_none(query_padding_mask), offsets,
                                      scale, impl, dropout)


def multi_source_attention(q: Tensor, sources: Sequence[Source], scale: Optional[float] = None,
                           query_padding_mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Σ_s softmax_s(q·k_sᵀ·scale, mask_s)·v_s.

    q (B, H, Lq, D); sources = [(k_s (B, H, L_s, D), v_s (B, H, L_s, D), key_padding_mask_s (B, L_s) bool
    True = padding, or None), ...] (S ≥ 1, lengths may differ, L_s may be 0); query_padding_mask (B, Lq)
    → (B, H, Lq, D). A source with no valid key for a row contributes zeros; a NaN or +inf score on a valid key of a
    source makes the row NaN (as ``testing.reference``; padded keys / query rows never matter).
    """
    check_float(q, "q", 4, "(B, H, Lq, D)")
    B, H, Lq, D = q.shape
    if isinstance(sources, (str, bytes)) or not hasattr(sources, "__len__") or len(sources) == 0:
        raise ValueError("sources must be a non-empty sequence of (k, v, key_padding_mask) tuples")
    for i, src in enumerate(sources):
        if not isinstance(src, (tuple, list)) or len(src) != 3:
            raise ValueError(f"sources[{i}] must be a (k, v, key_padding_mask or None) tuple")
        k, v, m = src
        check_float(k, f"sources[{i}] k", 4, "(B, H, L_s, D)")
        check_float(v, f"sources[{i}] v", 4, "(B, H, L_s, D)")
        check_same(k, f"sources[{i}] k", q, "q")
        check_same(v, f"sources[{i}] v", q, "q")
        if k.shape[:2] != (B, H) or k.shape[3] != D:
            raise ValueError(f"sources[{i}] k must be (B={B}, H={H}, L_s, D={D}), got {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"sources[{i}] v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if m is not None:
            check_mask(m, f"sources[{i}] key_padding_mask", (B, k.shape[2]), q.device)
    if query_padding_mask is not None:
        check_mask(query_padding_mask, "query_padding_mask", (B, Lq), q.device)
    scale = check_scale(scale, D)
    name = _dispatch.resolve(backend, q.device)
    unmasked = query_padding_mask is None and all(m is None for _, _, m in sources)
    if sdpa_route_applies(backend, name, q, [q, *(t for k, v, _ in sources for t in (k, v))], unmasked=unmasked,
                          n_sources=len(sources)):
        return run_sdpa(q, list(sources), scale, query_padding_mask)
    return run_segmented(q, list(sources), scale, query_padding_mask, name)
