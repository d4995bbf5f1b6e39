"""Segmented attention core (op "attention"): one kernel serves ``attention`` and ``multi_source_attention``.

Keys/values of S sources are concatenated along the sequence dim; ``src_offsets`` delimit them. Every query row
keeps one online-softmax state per source (exp2 domain), all sources are handled in one launch and the (Lq, Lk)
score matrix is never materialised.

Forward  (grid: query blocks x B*H): out = sum_s softmax_s(q k_s^T * scale) v_s, lse (B, H, S, Lq), per-source
         normalised outputs o_src (S, B, H, Lq, D) when S > 1 (the contract layer needs them for delta).
Backward (FlashAttention-2 style, P recomputed from lse, delta = rowsum(dout * o_s) given):
         dK/dV kernel (grid: source-aligned key blocks x B*H, so each key block belongs to one source and dk/dv
         need no atomics) + dQ kernel (grid: query blocks x B*H).

Masked keys get score -inf; a row whose source has no valid key (or whose valid scores are all -inf) gets lse = +inf,
so exp(s - lse) = 0 in backward and nothing is NaN. A NaN or +inf score on a valid key (NaN / inf in q or k) makes
that row's output and lse NaN, as ``msa_fast.testing.reference`` does; the backward then gives NaN on that row's
valid keys and 0 on masked ones. The check is in-kernel (a NaN softmax normaliser; no host sync) and independent of
how the target's max() treats NaN. Head dims are padded to a power of two >= 16 with masks (tl.dot needs dims >= 16 on
GPU).
fp32 dots use ``input_precision="ieee"`` (torch's default: no TF32), so interpreter and GPU agree.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import as_u8, block_d, check_offsets, make_signature, num_segment_blocks, offsets_tensor
from .counter_rng import SEED_PARAMS, dropout_args, dropout_scale, row_counter

@triton.jit
def find_segment_block(pid, OFFS, S, BLOCK: tl.constexpr):
    """(segment, first row, segment end) of row block ``pid`` when each of the S segments delimited by OFFS
    (S+1 int32) is tiled separately in blocks of BLOCK rows (host grid: kernels.num_segment_blocks)."""
    blk0 = pid * 0
    seg = pid * 0
    start = pid * 0
    end = pid * 0
    for s in range(S):
        s0 = tl.load(OFFS + s)
        s1 = tl.load(OFFS + s + 1)
        nb = (s1 - s0 + BLOCK - 1) // BLOCK
        hit = (pid >= blk0) & (pid < blk0 + nb)
        start = tl.where(hit, s0 + (pid - blk0) * BLOCK, start)
        end = tl.where(hit, s1, end)
        seg = tl.where(hit, s, seg)
        blk0 += nb
    return seg, start, end


@triton.jit(do_not_specialize=SEED_PARAMS)
def _attn_fwd_kernel(
    Q, K, V, KVALID, QVALID, OFFS, OUT, LSE, OSRC,
    H, Lq, Lk, S, D, store_src, scale,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    seed_lo: tl.int64, seed_hi: tl.int64, keep_thr: tl.int64, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Lq
    d_in = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                mask=m_in[:, None] & d_in[None, :], other=0.0)
    q_ok = tl.load(QVALID + b * Lq + offs_m, mask=m_in, other=0) != 0
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    qk_scale = scale * 1.4426950408889634  # exp2 domain
    row_lo, row_hi = row_counter(bh * Lq + offs_m, Lk)  # dropout counters of (row, key 0)
    total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(S):
        start = tl.load(OFFS + s)
        end = tl.load(OFFS + s + 1)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + offs_n
            c_in = cols < end
            k_ok = tl.load(KVALID + b * Lk + cols, mask=c_in, other=0) != 0
            kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None], mask=c_in[None, :] & d_in[:, None], other=0.0)
            sc = tl.dot(q, kt, input_precision="ieee") * qk_scale
            sc = tl.where(k_ok[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            # A row with no valid key so far keeps m = -inf; shift by 0 instead to avoid (-inf) - (-inf).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(sc - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts every key; dropout only thins P V
            if DROPOUT:  # element (row, key) draws counter (bh·Lq + row)·Lk + key (as the C++ kernel)
                p = p * dropout_scale(row_lo[:, None], row_hi[:, None], cols[None, :], seed_lo, seed_hi, keep_thr,
                                      inv_keep)
            vb = tl.load(v_base + cols[:, None] * svn + offs_d[None, :], mask=c_in[:, None] & d_in[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision="ieee")
            m_i = m_new
        # A NaN or +inf score on a valid key leaves l_i NaN whatever max() does with NaN (NaN lane: exp2(NaN) or a
        # NaN max; +inf lane: m = +inf, exp2(inf - inf)), and a finite / -inf row never does. So "l_i != 0" keeps
        # such rows, whose output and lse then come out NaN through l_i: the reference's NaN row, at no extra cost;
        # l_i == 0 (no valid key, or every valid score -inf) gives zeros and lse = +inf.
        has = (l_i != 0) & q_ok
        l_safe = tl.where(has, l_i, 1.0)
        o_s = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
        total += o_s
        lse = tl.where(has, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
        tl.store(LSE + (bh * S + s) * Lq + offs_m, lse, mask=m_in)
        if store_src != 0:
            src_stride = tl.num_programs(1) * Lq * D
            tl.store(OSRC + s * src_stride + (bh * Lq + offs_m[:, None]) * D + offs_d[None, :], o_s,
                     mask=m_in[:, None] & d_in[None, :])
    tl.store(OUT + (bh * Lq + offs_m[:, None]) * D + offs_d[None, :], total.to(OUT.dtype.element_ty),
             mask=m_in[:, None] & d_in[None, :])


@triton.jit(do_not_specialize=SEED_PARAMS)
def _attn_bwd_dkdv_kernel(
    Q, K, V, KVALID, QVALID, OFFS, LSE, DELTA, DO, DK, DV,
    H, Lq, Lk, S, D, scale,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    seed_lo: tl.int64, seed_hi: tl.int64, keep_thr: tl.int64, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    # Key blocks are tiled per source (a block never straddles two sources): find this block's source.
    src, start, end = find_segment_block(pid, OFFS, S, BLOCK_N)
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < end
    d_in = offs_d < D
    nd_mask = n_in[:, None] & d_in[None, :]
    k_ok = (tl.load(KVALID + b * Lk + offs_n, mask=n_in, other=0) != 0) & n_in
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :], mask=nd_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :], mask=nd_mask, other=0.0)
    qk_scale = scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_base = (bh * S + src) * Lq
    for m0 in range(0, Lq, BLOCK_M):
        rows = m0 + offs_m0
        r_in = rows < Lq
        md_mask = r_in[:, None] & d_in[None, :]
        q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + offs_d[None, :], mask=md_mask, other=0.0)
        q_ok = tl.load(QVALID + b * Lq + rows, mask=r_in, other=0) != 0
        lse = tl.load(LSE + row_base + rows, mask=r_in, other=float("inf"))
        lse = tl.where(q_ok, lse, float("inf"))
        dlt = tl.load(DELTA + row_base + rows, mask=r_in, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (N, M)
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        # valid (key, query row) pairs only: rows past Lq load q = 0, and 0 · inf in a key would give NaN scores
        ok = k_ok[:, None] & q_ok[None, :]
        pt = tl.where(ok, pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        if DROPOUT:  # Z = keep / (1 − p): dV uses (P∘Z)ᵀ, dS = P∘(dP∘Z − delta)
            r_lo, r_hi = row_counter(bh * Lq + rows, Lk)
            zt = dropout_scale(r_lo[None, :], r_hi[None, :], offs_n[:, None], seed_lo, seed_hi, keep_thr, inv_keep)
            dv += tl.dot((pt * zt).to(do.dtype), do, input_precision="ieee")
            dpt = dpt * zt
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
        # dS = 0 on masked keys even when delta is NaN (a NaN row), as the reference's masked_fill backward
        dst = tl.where(ok, pt * (dpt - dlt[None, :]), 0.0)
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")
    dk = dk * scale
    out_off = (bh * Lk + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(DK + out_off, dk.to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=nd_mask)


@triton.jit(do_not_specialize=SEED_PARAMS)
def _attn_bwd_dq_kernel(
    Q, K, V, KVALID, QVALID, OFFS, LSE, DELTA, DO, DQ,
    H, Lq, Lk, S, D, scale,
    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
    seed_lo: tl.int64, seed_hi: tl.int64, keep_thr: tl.int64, inv_keep,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < Lq
    d_in = offs_d < D
    md_mask = m_in[:, None] & d_in[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :], mask=md_mask, other=0.0)
    q_ok = tl.load(QVALID + b * Lq + offs_m, mask=m_in, other=0) != 0
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    qk_scale = scale * 1.4426950408889634
    row_lo, row_hi = row_counter(bh * Lq + offs_m, Lk)  # dropout counters of (row, key 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(S):
        start = tl.load(OFFS + s)
        end = tl.load(OFFS + s + 1)
        row_off = (bh * S + s) * Lq + offs_m
        lse = tl.load(LSE + row_off, mask=m_in, other=float("inf"))
        lse2 = tl.where(q_ok, lse * 1.4426950408889634, float("inf"))
        dlt = tl.load(DELTA + row_off, mask=m_in, other=0.0)
        for n0 in range(start, end, BLOCK_N):
            cols = n0 + offs_n0
            c_in = cols < end
            k_ok = tl.load(KVALID + b * Lk + cols, mask=c_in, other=0) != 0
            kb = tl.load(k_base + cols[:, None] * skn + offs_d[None, :], mask=c_in[:, None] & d_in[None, :], other=0.0)
            vt = tl.load(v_base + cols[None, :] * svn + offs_d[:, None], mask=c_in[None, :] & d_in[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(kb), input_precision="ieee") * qk_scale
            p = tl.exp2(sc - lse2[:, None])
            p = tl.where(k_ok[None, :], p, 0.0)
            dp = tl.dot(do, vt, input_precision="ieee")
            if DROPOUT:
                dp = dp * dropout_scale(row_lo[:, None], row_hi[:, None], cols[None, :], seed_lo, seed_hi, keep_thr,
                                        inv_keep)
            ds = p * (dp - dlt[:, None])
            dq += tl.dot(ds.to(kb.dtype), kb, input_precision="ieee")
    dq = dq * scale
    tl.store(DQ + (bh * Lq + offs_m[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=md_mask)


# ----------------------------------------------------------------------------------------------------------------
# Configs: hand-picked per padded head dim (no autotune). Same tiles on sm_80 and sm_90: at MSA sizes (L <= ~500,
# D <= 128) the kernels are bandwidth/latency bound and these tiles compile spill-free on both (tests/test_aot.py).
# ----------------------------------------------------------------------------------------------------------------
HEAD_DIM_BLOCKS = (16, 32, 64, 128)
AOT_DTYPES = ("fp32", "bf16")  # fp16 takes the bf16 configs (same tile sizes, same MMA shapes)
KINDS = ("fwd", "dkdv", "dq")
# Occupancy the tiles are sized for (register budget of tests/test_aot.py): one 8-warp or two 4-warp CTAs per SM.
# The FMA (fp32) and large-head-dim tiles hold 140-245 registers per thread; at MSA sizes the grid has
# cdiv(L, 64) x B·H CTAs and the kernels are latency bound, measured spill-free rather than occupancy-limited.
MIN_WARPS_PER_SM = 8


def _config(kind: str, bd: int, fp32: bool, dropout: bool = False) -> dict:
    """Tiles for kernel ``kind`` ("fwd", "dkdv", "dq") at padded head dim ``bd``.

    fp32 dots run as exact FMA loops (input_precision="ieee"), which hold more operand registers than tensor-core
    MMAs: they get 8 warps from bd >= 32 (16-bit from bd 64). All picks compile without spills for sm_80 and sm_90
    (tests/test_aot.py). Same tiles on both architectures: at MSA sizes (L <= ~500, D <= 128) the kernels are
    latency/bandwidth bound, and the AOT table shows no per-arch resource problem that would call for a split.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kernel kind {kind!r}")
    if bd == 128:
        # 32 x 32 tiles, 8 warps for every kernel. Measured at bd 128 (ptxas -v): the bd-64 tiles spill (16-bit
        # fwd 64x32 and dq 64x32 at 255 registers, dkdv 32x64 on sm_90), 16 warps spill more (128-register cap),
        # and the fp32 dq tile (FMA dots, all operands fp32) spills on sm_80 at BLOCK_N 32 but is clean at 16.
        return dict(BLOCK_M=32, BLOCK_N=16 if fp32 and kind == "dq" else 32, num_warps=8, num_stages=2)
    warps = 8 if bd == 64 or (fp32 and (bd >= 32 or dropout)) else 4
    if kind == "fwd":
        # 8 warps from bd 32: with 4 warps the bd-64 16-bit tile sat at 255 registers (no spill, no headroom).
        # (dropout: the in-tile hash of the 64 x 64 fp32 tile spilled at 4 warps on sm_80 / sm_90 -> 8 warps)
        if fp32 and bd <= 32:
            # The 64 x 64 fp32 tiles compiled clean with the generic signature but spilled 4-12 B as launched (S = 1
            # constexpr, 16-divisible strides; tests/test_aot.py launch specialisations): 64 x 32, 8 warps (bd 16:
            # 4 warps spilled on sm_90 even at 64 x 32), and 32 x 32 with dropout at bd 32 (64 x 32 spilled).
            # bd 32 without dropout: 64 x 32 at 8 warps spilled 12 B with the generic signature on sm_80 -> 4 warps
            # (204 registers, clean generic and as launched).
            if bd == 32 and not dropout:
                return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
            return dict(BLOCK_M=32 if dropout and bd == 32 else 64, BLOCK_N=32, num_warps=8, num_stages=2)
        if fp32 and bd == 64:
            # no dropout: 64 x 32 spilled 12-24 B multi-source (store_src) as launched -> 32 x 32; with dropout
            # 32 x 32 spilled 72 B (generic, sm_80) while 64 x 32 at 8 warps is clean (199 registers)
            return dict(BLOCK_M=64 if dropout else 32, BLOCK_N=32, num_warps=8, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=64 if bd <= 32 else 32, num_warps=4 if bd == 16 and not dropout else 8,
                    num_stages=2)
    if kind == "dkdv":
        # 32 x 64 spilled as launched: fp32 + dropout at bd 32 (8 / 24 B) -> 32 x 32; fp32 at bd 64 without dropout
        # (16 B multi-source on sm_80) -> 16 x 64 (32 x 32 spilled 8 B there at S = 1)
        if fp32 and dropout and bd == 32:
            return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2)
        if fp32 and not dropout and bd == 64:
            return dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=warps, num_stages=2)
    if fp32 and dropout:  # FMA dots + the hash of the dP tile spilled at BLOCK_N 32 (and at 8 warps for bd 16)
        return dict(BLOCK_M=64, BLOCK_N=16, num_warps=4 if bd == 16 else 8, num_stages=2)
    # dq, as launched: fp32 bd 16 at 4 warps spilled 16 B (sm_80 and sm_90) -> 8 warps (110 registers); 16-bit
    # bd 64 at 64 x 32 spilled 24 B on sm_80 -> 64 x 16 (177 registers)
    if fp32 and bd == 16:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    if fp32 and bd == 64:  # 64 x 32 at 8 warps spilled 32-64 B multi-source as launched (sm_90) -> 32 x 16,
        # 4 warps (168 registers)
        return dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=2)
    if not fp32 and bd == 64:
        return dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=warps, num_stages=2)


def _launch_cfg(kind: str, bd: int, dtype: torch.dtype, block_m: Optional[int], block_n: Optional[int],
                dropout: bool = False) -> dict:
    cfg = _config(kind, bd, dtype == torch.float32, dropout)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    return cfg


def _aot_configs() -> list[dict]:
    kernels = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
    out = []
    for kind, fn in kernels.items():
        for bd in HEAD_DIM_BLOCKS:
            # At bd 128 the 16-bit tiles sit at 190-245 registers: fp16 is compiled too, not assumed equal to bf16.
            for dt in AOT_DTYPES + (("fp16",) if bd == 128 else ()):
                for dropout in (False, True):
                    cfg = _config(kind, bd, dt == "fp32", dropout)
                    constexprs = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, DROPOUT=dropout)
                    t = "*" + dt
                    types = dict(Q=t, K=t, V=t, KVALID="*u8", QVALID="*u8", OFFS="*i32", scale="fp32",
                                 seed_lo="i64", seed_hi="i64", keep_thr="i64", inv_keep="fp32")
                    if kind == "fwd":
                        types.update(OUT=t, LSE="*fp32", OSRC="*fp32")
                    else:
                        types.update(LSE="*fp32", DELTA="*fp32", DO=t)
                        types.update(dict(DK=t, DV=t) if kind == "dkdv" else dict(DQ=t))
                    out.append(dict(kernel=fn, name=f"attention.{kind}.d{bd}.{t[1:]}{'.dropout' if dropout else ''}",
                                    signature=make_signature(fn, types, constexprs), constexprs=constexprs,
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                    min_warps_per_sm=MIN_WARPS_PER_SM))
    return out


AOT_CONFIGS = _aot_configs()


# ----------------------------------------------------------------------------------------------------------------
# Host launchers (backend contract, helper_notes/OPS_CONTRACT.md)
# ----------------------------------------------------------------------------------------------------------------
def _last_dim_contig(t: torch.Tensor) -> torch.Tensor:
    # Kernels take (b, h, l) strides and assume a unit stride along D; other layouts (e.g. a (B, L, H, D) tensor
    # viewed as (B, H, L, D)) are used without a copy.
    return t if t.stride(-1) == 1 else t.contiguous()


def _valid_u8(valid: Optional[torch.Tensor], B: int, L: int, device, name: str) -> torch.Tensor:
    if valid is None:
        return torch.ones((B, L), dtype=torch.uint8, device=device)
    if valid.shape != (B, L):
        raise ValueError(f"{name} must have shape {(B, L)}, got {tuple(valid.shape)}")
    return as_u8(valid)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q, k, v must be (B, H, L, D) with k.shape == v.shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")


#: in-kernel dropout on the probabilities (``dropout=(p, seed)``), mask regenerated in backward (counter_rng.py)
supports_dropout = True


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, src_offsets,
            q_valid: Optional[torch.Tensor], scale: float, dropout=None, *, block_m: Optional[int] = None,
            block_n: Optional[int] = None):
    """Segmented attention forward.

    q (B, H, Lq, D); k, v (B, H, Lk, D) (S sources concatenated); key_valid (B, Lk) bool (True = valid);
    src_offsets: S+1 python ints; q_valid (B, Lq) bool or None; scale: float.
    Returns out (B, H, Lq, D) q.dtype, lse (B, H, S, Lq) fp32 (+inf for empty / invalid rows),
    o_src (S, B, H, Lq, D) fp32 or None when S == 1. ``dropout`` = (p, seed) drops probabilities with the mask
    of ``dropout_keep_mask(seed, (B, H, Lq, Lk), p)``. ``block_m`` / ``block_n`` override the tiles (tests).
    """
    _check_qkv(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    offs = check_offsets(src_offsets, Lk, "src_offsets")
    S = len(offs) - 1
    q, k, v = _last_dim_contig(q), _last_dim_contig(k), _last_dim_contig(v)
    kv = _valid_u8(key_valid, B, Lk, q.device, "key_valid")
    qv = _valid_u8(q_valid, B, Lq, q.device, "q_valid")
    bd = block_d(D)
    cfg = _launch_cfg("fwd", bd, q.dtype, block_m, block_n, dropout is not None)
    out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, S, Lq), dtype=torch.float32, device=q.device)
    o_src = torch.empty((S, B, H, Lq, D), dtype=torch.float32, device=q.device) if S > 1 else None
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
    if Lq > 0 and B * H > 0:
        _attn_fwd_kernel[grid](
            q, k, v, kv, qv, offsets_tensor(offs, q.device), out, lse, o_src if o_src is not None else lse,
            H, Lq, Lk, S, D, int(S > 1), float(scale),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), *dropout_args(dropout),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, DROPOUT=dropout is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, lse, o_src


def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor, src_offsets,
             q_valid: Optional[torch.Tensor], scale: float, lse: torch.Tensor, delta: torch.Tensor,
             dout: torch.Tensor, dropout=None, *, block_m: Optional[int] = None, block_n: Optional[int] = None):
    """Segmented attention backward: P recomputed from ``lse`` (B, H, S, Lq); ``delta`` (B, H, S, Lq) fp32 =
    sum_d dout * o_s; dout (B, H, Lq, D). Returns dq, dk, dv with the shapes/dtypes of q, k, v."""
    _check_qkv(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    offs = check_offsets(src_offsets, Lk, "src_offsets")
    S = len(offs) - 1
    for name, t in (("lse", lse), ("delta", delta)):
        if t.shape != (B, H, S, Lq):
            raise ValueError(f"{name} must have shape {(B, H, S, Lq)}, got {tuple(t.shape)}")
    if dout.shape != q.shape:
        raise ValueError(f"dout must have shape {tuple(q.shape)}, got {tuple(dout.shape)}")
    q, k, v, dout = (_last_dim_contig(t) for t in (q, k, v, dout))
    lse = lse.float().contiguous()
    delta = delta.float().contiguous()
    kv = _valid_u8(key_valid, B, Lk, q.device, "key_valid")
    qv = _valid_u8(q_valid, B, Lq, q.device, "q_valid")
    offs_t = offsets_tensor(offs, q.device)
    bd = block_d(D)
    dq = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, Lk, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, Lk, D), dtype=v.dtype, device=q.device)
    if B * H == 0:
        return dq, dk, dv
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
               *dropout_args(dropout))
    if Lq == 0:  # no query contributes: zero key gradients
        dk.zero_()
        dv.zero_()
    elif Lk > 0:
        cfg = _launch_cfg("dkdv", bd, q.dtype, block_m, block_n, dropout is not None)
        grid = (num_segment_blocks(offs, cfg["BLOCK_N"]), B * H)
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, kv, qv, offs_t, lse, delta, dout, dk, dv, H, Lq, Lk, S, D, float(scale), *strides,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, DROPOUT=dropout is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if Lq > 0:
        cfg = _launch_cfg("dq", bd, q.dtype, block_m, block_n, dropout is not None)
        grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), B * H)
        _attn_bwd_dq_kernel[grid](
            q, k, v, kv, qv, offs_t, lse, delta, dout, dq, H, Lq, Lk, S, D, float(scale), *strides,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=bd, DROPOUT=dropout is not None,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return dq, dk, dv

