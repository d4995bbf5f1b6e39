"""Bottleneck exchange (op "bottleneck_exchange"): each modality's tokens attend to K <= 16 bottleneck keys.

The M modalities' query tokens are concatenated along the sequence dim (``q_offsets`` delimit them); modality m's
projection of the bottleneck tokens is ``k[:, :, m]``, ``v[:, :, m]`` (B, H, M, K, D). One program per (query block,
b*h): query blocks are tiled per segment (never straddle two modalities), so a program finds its segment from the
offsets, loads that segment's K x D keys/values once (K padded to 16 for tl.dot) and does a single-pass softmax.

A NaN / +inf score on a valid key gives a NaN row (output and lse), as the reference; all valid scores -inf (or no
valid key) gives zeros and lse = +inf.

Backward: one kernel recomputes P from lse and writes dq plus per-block partials of dk / dv (K x D each, fp32); the
partials are reduced per segment in torch (``index_add_``), so no atomics and deterministic on CPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import as_u8, block_d, check_offsets, make_signature, num_segment_blocks, offsets_tensor
from .attention import find_segment_block

MAX_KEYS = 16


@triton.jit
def _bx_fwd_kernel(
    Q, K, V, KVALID, QVALID, OFFS, OUT, LSE,
    H, Lq, M, Kn, D, scale,
    sqb, sqh, sqm, skb, skh, skm, skk, svb, svh, svm, svk,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    seg, start, end = find_segment_block(pid, OFFS, M, BLOCK_M)
    rows = start + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    r_in = rows < end
    d_in = offs_d < D
    k_in = offs_k < Kn
    md_mask = r_in[:, None] & d_in[None, :]
    kd_mask = k_in[:, None] & d_in[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=md_mask, other=0.0)
    q_ok = tl.load(QVALID + b * Lq + rows, mask=r_in, other=0) != 0
    k_ok = (tl.load(KVALID + b * Kn + offs_k, mask=k_in, other=0) != 0) & k_in
    k = tl.load(K + b * skb + h * skh + seg * skm + offs_k[:, None] * skk + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + seg * svm + offs_k[:, None] * svk + offs_d[None, :], mask=kd_mask, other=0.0)
    sc = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * 1.4426950408889634)
    sc = tl.where(k_ok[None, :], sc, float("-inf"))
    m_i = tl.max(sc, 1)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)  # no valid key: avoid (-inf) - (-inf)
    p = tl.exp2(sc - m_safe[:, None])
    l_i = tl.sum(p, 1)
    # a NaN / +inf score on a valid key leaves l_i NaN whatever max() does with NaN (a finite / -inf row never
    # does): "l_i != 0" keeps such rows, whose output and lse come out NaN through l_i, as in the reference
    has = (l_i != 0) & q_ok
    l_safe = tl.where(has, l_i, 1.0)
    o = tl.dot(p.to(v.dtype), v, input_precision="ieee") / l_safe[:, None]
    o = tl.where(has[:, None], o, 0.0)
    tl.store(OUT + (bh * Lq + rows[:, None]) * D + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=md_mask)
    lse = tl.where(has, (m_safe + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    tl.store(LSE + bh * Lq + rows, lse, mask=r_in)


@triton.jit
def _bx_bwd_kernel(
    Q, K, V, KVALID, QVALID, OFFS, LSE, DELTA, DO, DQ, DKP, DVP,
    H, Lq, M, Kn, D, NB, scale,
    sqb, sqh, sqm, skb, skh, skm, skk, svb, svh, svm, svk, sdob, sdoh, sdom,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    seg, start, end = find_segment_block(pid, OFFS, M, BLOCK_M)
    rows = start + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    r_in = rows < end
    d_in = offs_d < D
    k_in = offs_k < Kn
    md_mask = r_in[:, None] & d_in[None, :]
    kd_mask = k_in[:, None] & d_in[None, :]
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=md_mask, other=0.0)
    q_ok = tl.load(QVALID + b * Lq + rows, mask=r_in, other=0) != 0
    lse = tl.load(LSE + bh * Lq + rows, mask=r_in, other=float("inf"))
    lse2 = tl.where(q_ok, lse * 1.4426950408889634, float("inf"))
    dlt = tl.load(DELTA + bh * Lq + rows, mask=r_in, other=0.0)
    k_ok = (tl.load(KVALID + b * Kn + offs_k, mask=k_in, other=0) != 0) & k_in
    k = tl.load(K + b * skb + h * skh + seg * skm + offs_k[:, None] * skk + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + seg * svm + offs_k[:, None] * svk + offs_d[None, :], mask=kd_mask, other=0.0)
    sc = tl.dot(q, tl.trans(k), input_precision="ieee") * (scale * 1.4426950408889634)
    p = tl.exp2(sc - lse2[:, None])
    # valid (query row, key) pairs only: rows past the segment load q = 0, and 0 · inf in a key would give NaN
    ok = q_ok[:, None] & k_ok[None, :]
    p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee")
    ds = tl.where(ok, p * (dp - dlt[:, None]), 0.0)  # 0 on masked keys even for NaN rows (NaN delta)
    dq = tl.dot(ds.to(k.dtype), k, input_precision="ieee") * scale
    tl.store(DQ + (bh * Lq + rows[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)
    dk_part = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee") * scale
    dv_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
    part = ((bh * NB + pid) * Kn + offs_k[:, None]) * D + offs_d[None, :]
    tl.store(DKP + part, dk_part, mask=kd_mask)
    tl.store(DVP + part, dv_part, mask=kd_mask)


# ----------------------------------------------------------------------------------------------------------------
# Configs (no autotune): K is padded to 16; one row-block size per head dim / dtype.
# ----------------------------------------------------------------------------------------------------------------
HEAD_DIM_BLOCKS = (16, 32, 64, 128)
AOT_DTYPES = ("fp32", "bf16")  # fp16 takes the bf16 configs


def _config(kind: str, bd: int, fp32: bool) -> dict:
    """Tiles for ``kind`` ("fwd" / "bwd") at padded head dim ``bd``; all compile spill-free (tests/test_aot.py)."""
    if kind not in ("fwd", "bwd"):
        raise ValueError(f"unknown kernel kind {kind!r}")
    if bd == 128:
        # 64-row blocks reach 255 registers at bd 128 (fp32 bwd spills ~270 B); 32 rows x 8 warps stay under 100.
        return dict(BLOCK_M=32, BLOCK_K=16, num_warps=8, num_stages=1)
    # 64-row blocks at bd <= 32 made ptxas spill a few bytes on sm_80 (fwd d16 fp32, bwd d32 bf16) at only
    # 56-96 registers; 32-row blocks compile clean and still give B*H*ceil(L/32) programs.
    # bd 64: 8 warps (16-bit bwd held 146-158 registers at 4 warps, over the default occupancy budget; 104-128 at 8)
    return dict(BLOCK_M=32 if bd <= 32 else 64, BLOCK_K=16, num_warps=8 if bd >= 64 else 4, num_stages=1)


def _aot_configs() -> list[dict]:
    out = []
    for kind, fn in (("fwd", _bx_fwd_kernel), ("bwd", _bx_bwd_kernel)):
        for bd in HEAD_DIM_BLOCKS:
            for dt in AOT_DTYPES + (("fp16",) if bd == 128 else ()):  # bd 128: fp16 compiled too (as attention)
                cfg = _config(kind, bd, dt == "fp32")
                constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd)
                t = "*" + dt
                types = dict(Q=t, K=t, V=t, KVALID="*u8", QVALID="*u8", OFFS="*i32", scale="fp32")
                if kind == "fwd":
                    types.update(OUT=t, LSE="*fp32")
                else:
                    types.update(LSE="*fp32", DELTA="*fp32", DO=t, DQ=t, DKP="*fp32", DVP="*fp32")
                out.append(dict(kernel=fn, name=f"bottleneck_exchange.{kind}.d{bd}.{dt}",
                                signature=make_signature(fn, types, constexprs), constexprs=constexprs,
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out


AOT_CONFIGS = _aot_configs()


# ----------------------------------------------------------------------------------------------------------------
# Host launchers (backend contract)
# ----------------------------------------------------------------------------------------------------------------
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offsets) -> tuple[int, ...]:
    if q.dim() != 4 or k.dim() != 5 or v.shape != k.shape:
        raise ValueError(f"q must be (B, H, Lq, D) and k, v (B, H, M, K, D) with equal shapes, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[4] != D:
        raise ValueError(f"k {tuple(k.shape)} disagrees with q {tuple(q.shape)} on B, H or D")
    if not 1 <= k.shape[3] <= MAX_KEYS:
        raise ValueError(f"the triton bottleneck kernel supports 1..{MAX_KEYS} bottleneck keys, got {k.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
    offs = check_offsets(q_offsets, Lq, "q_offsets")
    if len(offs) - 1 != k.shape[2]:
        raise ValueError(f"q_offsets describes {len(offs) - 1} segments but k has M={k.shape[2]} modalities")
    return offs


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _valid(mask: Optional[torch.Tensor], shape: tuple, device, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.uint8, device=device)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(mask.shape)}")
    return as_u8(mask)


def forward(q: torch.Tensor, q_offsets, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
            q_valid: Optional[torch.Tensor], scale: float, *, block_m: Optional[int] = None):
    """q (B, H, Lq, D) with M segments (q_offsets: M+1 ints); k, v (B, H, M, K, D), K <= 16; key_valid (B, K) bool
    or None; q_valid (B, Lq) bool or None → out (B, H, Lq, D) q.dtype, lse (B, H, Lq) fp32 (+inf: empty/invalid)."""
    offs = _check(q, k, v, q_offsets)
    B, H, Lq, D = q.shape
    M, Kn = k.shape[2], k.shape[3]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    kv = _valid(key_valid, (B, Kn), q.device, "key_valid")
    qv = _valid(q_valid, (B, Lq), q.device, "q_valid")
    bd = block_d(D)
    cfg = _config("fwd", bd, q.dtype == torch.float32)
    bm = block_m or cfg["BLOCK_M"]
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    nb = num_segment_blocks(offs, bm)
    if nb > 0 and B * H > 0:
        _bx_fwd_kernel[(nb, B * H)](
            q, k, v, kv, qv, offsets_tensor(offs, q.device), out, lse, H, Lq, M, Kn, D, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3),
            BLOCK_M=bm, BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse


def backward(q: torch.Tensor, q_offsets, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
             q_valid: Optional[torch.Tensor], scale: float, lse: torch.Tensor, delta: torch.Tensor,
             dout: torch.Tensor, *, block_m: Optional[int] = None):
    """lse, delta (B, H, Lq) fp32 (delta = sum_d dout * out); dout (B, H, Lq, D) → dq, dk, dv like q, k, v."""
    offs = _check(q, k, v, q_offsets)
    B, H, Lq, D = q.shape
    M, Kn = k.shape[2], k.shape[3]
    for name, t in (("lse", lse), ("delta", delta)):
        if tuple(t.shape) != (B, H, Lq):
            raise ValueError(f"{name} must have shape {(B, H, Lq)}, got {tuple(t.shape)}")
    if dout.shape != q.shape:
        raise ValueError(f"dout must have shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    q, k, v, dout = (_unit_last(t) for t in (q, k, v, dout))
    lse = lse.float().contiguous()
    delta = delta.float().contiguous()
    kv = _valid(key_valid, (B, Kn), q.device, "key_valid")
    qv = _valid(q_valid, (B, Lq), q.device, "q_valid")
    bd = block_d(D)
    cfg = _config("bwd", bd, q.dtype == torch.float32)
    bm = block_m or cfg["BLOCK_M"]
    nb = num_segment_blocks(offs, bm)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk32 = torch.zeros((B * H, M, Kn, D), dtype=torch.float32, device=q.device)
    dv32 = torch.zeros((B * H, M, Kn, D), dtype=torch.float32, device=q.device)
    if nb > 0 and B * H > 0:
        dkp = torch.empty((B * H, nb, Kn, D), dtype=torch.float32, device=q.device)
        dvp = torch.empty((B * H, nb, Kn, D), dtype=torch.float32, device=q.device)
        _bx_bwd_kernel[(nb, B * H)](
            q, k, v, kv, qv, offsets_tensor(offs, q.device), lse, delta, dout, dq, dkp, dvp,
            H, Lq, M, Kn, D, nb, float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
            v.stride(0), v.stride(1), v.stride(2), v.stride(3), dout.stride(0), dout.stride(1), dout.stride(2),
            BLOCK_M=bm, BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
        blocks = [m for m, (a, e) in enumerate(zip(offs, offs[1:])) for _ in range(-(-(e - a) // bm))]
        seg_of_block = torch.tensor(blocks, dtype=torch.long, device=q.device)
        dk32.index_add_(1, seg_of_block, dkp)
        dv32.index_add_(1, seg_of_block, dvp)
    dk = dk32.view(B, H, M, Kn, D).to(k.dtype)
    dv = dv32.view(B, H, M, Kn, D).to(v.dtype)
    return dq, dk, dv

