"""Triton mixture of expert FFNs (ops "expert_mixture" dense / "expert_mixture_topk" routed), forward and backward.

Dense (x (N, d), gates (N, E), w1 (E, d, h), b1 (E, h), w2 (E, h, d), b2 (E, d)), six kernels:
- fc1:  Z = x @ w1[e] + b1[e] for every expert, tiles (row block, expert, hidden block); Z (N, E, h) fp32 is the
        only saved activation;
- fc2:  out = Σ_e (act(Z_e) · gates[:, e]) @ w2[e] + gates @ b2 — activation and gate scaling fused into the GEMM
        prologue (S is never stored), the gates @ b2 term into the epilogue;
- bwd:  dz (dS = dout @ w2[e]ᵀ in the GEMM, epilogue recomputes act / act' from Z: dZ = dS·g·act'(Z), and the
        per-hidden-block partial Σ dS·act(Z) of dgates; the host adds dout @ b2ᵀ and sums the partials),
        dw2 (act(Z)·g recomputed in the prologue; db2 = gatesᵀ dout in the same loop), dw1 (+ db1), dx.
Top-k (expert_idx (N, k), expert_weight (N, k)): permute (one program: histogram + prefix sum + stable scatter of
the N·k slots by expert id, also the per-expert row-tile offsets) → grouped fc1 / fc2 (row tiles never straddle
experts; the expert of a tile is found from the tile offsets on the device) → unpermute (gather + weighted sum over
the k slots, deterministic). Backward: dy/dweight per sorted slot, grouped dz (act' epilogue), per-expert dw2 / db2
and dw1 / db1 reduction kernels (loop bounds read from the offsets), grouped dx-rows + unpermute gather.

Inputs may be strided (strides are passed; no copies). fp32 dots use ``input_precision="ieee"``; fp16 / bf16
operands accumulate in fp32; Z / Y buffers are fp32. One config for all shapes (BLOCK 64 x 64 x 16, 8 warps) —
large enough for the interpreter, spill-free on sm_80 / sm_90 (AOT_CONFIGS, tests/test_aot.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import make_signature

_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _act(z, GELU: tl.constexpr):
    if GELU:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    else:
        return tl.maximum(z, 0.0)


@triton.jit
def _act_grad(z, GELU: tl.constexpr):
    if GELU:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    else:
        return tl.where(z > 0.0, 1.0, 0.0)


# ============================================================================================ dense kernels
@triton.jit
def _dense_fc1_kernel(X, W1, B1, Z, N, D, H, sxn, sxd, sw1e, sw1d, sw1h, sb1e, sb1h,
                      BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    nhb = tl.cdiv(H, BLOCK_H)
    e = tl.program_id(1) // nhb
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(1) % nhb) * BLOCK_H + tl.arange(0, BLOCK_H)
    rm, cm = rows < N, cols < H
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < D
        x = tl.load(X + rows[:, None] * sxn + ks[None, :] * sxd, mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(W1 + e * sw1e + ks[:, None] * sw1d + cols[None, :] * sw1h, mask=km[:, None] & cm[None, :],
                    other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    acc += tl.load(B1 + e * sb1e + cols * sb1h, mask=cm, other=0.0).to(tl.float32)[None, :]
    E = tl.num_programs(1) // nhb
    tl.store(Z + (rows[:, None] * E + e) * H + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


@triton.jit
def _dense_fc2_kernel(Z, G, W2, B2, OUT, N, D, H, E, sgn, sge, sw2e, sw2h, sw2d, sb2e, sb2d, son, sod,
                      GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, cm = rows < N, cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e in range(E):
        g = tl.load(G + rows * sgn + e * sge, mask=rm, other=0.0).to(tl.float32)
        b = tl.load(B2 + e * sb2e + cols * sb2d, mask=cm, other=0.0).to(tl.float32)
        acc += g[:, None] * b[None, :]
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < H
            z = tl.load(Z + (rows[:, None] * E + e) * H + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            s = _act(z, GELU) * g[:, None]
            w = tl.load(W2 + e * sw2e + ks[:, None] * sw2h + cols[None, :] * sw2d, mask=km[:, None] & cm[None, :],
                        other=0.0)
            acc += tl.dot(s.to(w.dtype), w, input_precision="ieee")
    tl.store(OUT + rows[:, None] * son + cols[None, :] * sod, acc.to(OUT.dtype.element_ty),
             mask=rm[:, None] & cm[None, :])


@triton.jit
def _dense_dz_kernel(DOUT, W2, Z, G, DZ, GPART, N, D, H, sdn, sdd, sw2e, sw2h, sw2d, sgn, sge,
                     GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    nhb = tl.cdiv(H, BLOCK_H)
    E = tl.num_programs(1) // nhb
    e = tl.program_id(1) // nhb
    hb = tl.program_id(1) % nhb
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    rm, cm = rows < N, cols < H
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < D
        go = tl.load(DOUT + rows[:, None] * sdn + ks[None, :] * sdd, mask=rm[:, None] & km[None, :], other=0.0)
        wt = tl.load(W2 + e * sw2e + cols[None, :] * sw2h + ks[:, None] * sw2d, mask=km[:, None] & cm[None, :],
                     other=0.0)  # (BLOCK_K, BLOCK_H) = w2[e]ᵀ tile
        acc += tl.dot(go, wt, input_precision="ieee")
    m2 = rm[:, None] & cm[None, :]
    z = tl.load(Z + (rows[:, None] * E + e) * H + cols[None, :], mask=m2, other=0.0)
    g = tl.load(G + rows * sgn + e * sge, mask=rm, other=0.0).to(tl.float32)
    part = tl.sum(acc * _act(z, GELU), 1)
    tl.store(GPART + (rows * E + e) * nhb + hb, part, mask=rm)
    dz = acc * g[:, None] * _act_grad(z, GELU)
    tl.store(DZ + (rows[:, None] * E + e) * H + cols[None, :], dz.to(DZ.dtype.element_ty), mask=m2)


@triton.jit
def _dense_dw2_kernel(Z, G, DOUT, DW2, DB2, N, D, H, sgn, sge, sdn, sdd,
                      GELU: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    nhb = tl.cdiv(H, BLOCK_H)
    E = tl.num_programs(0) // nhb
    e = tl.program_id(0) // nhb
    hb = tl.program_id(0) % nhb
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hm, cm = hs < H, cols < D
    acc = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    accb = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        nm = ns < N
        z = tl.load(Z + (ns[:, None] * E + e) * H + hs[None, :], mask=nm[:, None] & hm[None, :], other=0.0)
        g = tl.load(G + ns * sgn + e * sge, mask=nm, other=0.0).to(tl.float32)
        go = tl.load(DOUT + ns[:, None] * sdn + cols[None, :] * sdd, mask=nm[:, None] & cm[None, :], other=0.0)
        s = _act(z, GELU) * g[:, None]
        acc += tl.dot(tl.trans(s.to(go.dtype)), go, input_precision="ieee")
        accb += tl.sum(g[:, None] * go.to(tl.float32), 0)
    tl.store(DW2 + (e * H + hs[:, None]) * D + cols[None, :], acc.to(DW2.dtype.element_ty),
             mask=hm[:, None] & cm[None, :])
    tl.store(DB2 + e * D + cols, accb.to(DB2.dtype.element_ty), mask=cm & (hb == 0))


@triton.jit
def _dense_dw1_kernel(X, DZ, DW1, DB1, N, D, H, sxn, sxd,
                      BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    nhb = tl.cdiv(H, BLOCK_H)
    E = tl.num_programs(1) // nhb
    e = tl.program_id(1) // nhb
    hs = (tl.program_id(1) % nhb) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    hm, dm = hs < H, ds < D
    acc = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
    accb = tl.zeros([BLOCK_H], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        nm = ns < N
        xt = tl.load(X + ns[None, :] * sxn + ds[:, None] * sxd, mask=dm[:, None] & nm[None, :], other=0.0)
        dz = tl.load(DZ + (ns[:, None] * E + e) * H + hs[None, :], mask=nm[:, None] & hm[None, :], other=0.0)
        acc += tl.dot(xt, dz, input_precision="ieee")
        accb += tl.sum(dz.to(tl.float32), 0)
    tl.store(DW1 + (e * D + ds[:, None]) * H + hs[None, :], acc.to(DW1.dtype.element_ty),
             mask=dm[:, None] & hm[None, :])
    tl.store(DB1 + e * H + hs, accb.to(DB1.dtype.element_ty), mask=hm & (tl.program_id(0) == 0))


@triton.jit
def _dense_dx_kernel(DZ, W1, DX, N, D, H, E, sw1e, sw1d, sw1h,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, cm = rows < N, cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for e in range(E):
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < H
            dz = tl.load(DZ + (rows[:, None] * E + e) * H + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            wt = tl.load(W1 + e * sw1e + cols[None, :] * sw1d + ks[:, None] * sw1h, mask=km[:, None] & cm[None, :],
                         other=0.0)  # (BLOCK_K, BLOCK_N) = w1[e]ᵀ tile
            acc += tl.dot(dz, wt, input_precision="ieee")
    tl.store(DX + rows[:, None] * D + cols[None, :], acc.to(DX.dtype.element_ty), mask=rm[:, None] & cm[None, :])


# ============================================================================================ top-k kernels
@triton.jit
def _permute_kernel(IDX, ORDER, POS, OFFS, TOFFS, M, E, TILE_M: tl.constexpr, BLOCK: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    """One program: histogram of the M slot expert ids, exclusive prefix sums (rows and TILE_M row tiles per
    expert), then a stable scatter: ORDER[p] = slot at sorted position p, POS[slot] = p."""
    es = tl.arange(0, BLOCK_E)
    em = es < E
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for s0 in range(0, M, BLOCK):
        sl = s0 + tl.arange(0, BLOCK)
        ids = tl.load(IDX + sl, mask=sl < M, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == es[None, :]).to(tl.int32), 0)
    ends = tl.cumsum(counts, 0)
    starts = ends - counts
    tiles = (counts + TILE_M - 1) // TILE_M
    tends = tl.cumsum(tiles, 0)
    tl.store(OFFS + es, starts, mask=em)
    tl.store(OFFS + es + 1, ends, mask=em & (es == E - 1))
    tl.store(TOFFS + es, tends - tiles, mask=em)
    tl.store(TOFFS + es + 1, tends, mask=em & (es == E - 1))
    running = starts
    for s0 in range(0, M, BLOCK):
        sl = s0 + tl.arange(0, BLOCK)
        ids = tl.load(IDX + sl, mask=sl < M, other=-1).to(tl.int32)
        onehot = (ids[:, None] == es[None, :]).to(tl.int32)
        rank = tl.cumsum(onehot, 0) - onehot
        p = tl.sum((rank + running[None, :]) * onehot, 1)
        ok = sl < M
        tl.store(ORDER + p, sl, mask=ok)
        tl.store(POS + sl, p, mask=ok)
        running += tl.sum(onehot, 0)


@triton.jit
def _tile_rows(OFFS, TOFFS, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, rows, row mask, valid) of this program's row tile (program_id(0)); valid is False past the last."""
    t = tl.program_id(0)
    es = tl.arange(0, BLOCK_E)
    toffs = tl.load(TOFFS + es, mask=es < E, other=2147483647)
    e = tl.sum((toffs <= t).to(tl.int32), 0) - 1
    total = tl.load(TOFFS + E)
    e = tl.minimum(tl.maximum(e, 0), E - 1)
    start = tl.load(OFFS + e) + (t - tl.load(TOFFS + e)) * BLOCK_M
    end = tl.load(OFFS + e + 1)
    rows = start + tl.arange(0, BLOCK_M)
    valid = t < total
    return e, rows, (rows < end) & valid, valid


@triton.jit
def _topk_fc1_kernel(X, ORDER, OFFS, TOFFS, W1, B1, Z, D, H, E, K, sxn, sxd, sw1e, sw1d, sw1h, sb1e, sb1h,
                     BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    e, rows, rm, valid = _tile_rows(OFFS, TOFFS, E, BLOCK_M, BLOCK_E)
    if valid:
        tok = tl.load(ORDER + rows, mask=rm, other=0) // K
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cm = cols < H
        acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < D
            x = tl.load(X + tok[:, None] * sxn + ks[None, :] * sxd, mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(W1 + e * sw1e + ks[:, None] * sw1d + cols[None, :] * sw1h, mask=km[:, None] & cm[None, :],
                        other=0.0)
            acc += tl.dot(x, w, input_precision="ieee")
        acc += tl.load(B1 + e * sb1e + cols * sb1h, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(Z + rows[:, None] * H + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


@triton.jit
def _topk_fc2_kernel(Z, OFFS, TOFFS, W2, B2, Y, D, H, E, sw2e, sw2h, sw2d, sb2e, sb2d,
                     GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_E: tl.constexpr):
    e, rows, rm, valid = _tile_rows(OFFS, TOFFS, E, BLOCK_M, BLOCK_E)
    if valid:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < D
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < H
            z = tl.load(Z + rows[:, None] * H + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(W2 + e * sw2e + ks[:, None] * sw2h + cols[None, :] * sw2d, mask=km[:, None] & cm[None, :],
                        other=0.0)
            acc += tl.dot(_act(z, GELU).to(w.dtype), w, input_precision="ieee")
        acc += tl.load(B2 + e * sb2e + cols * sb2d, mask=cm, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows[:, None] * D + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


@triton.jit
def _unpermute_kernel(Y, POS, W, OUT, N, D, K, swn, swk, son, sod,
                      HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[n] = Σ_j W[n, j] · Y[POS[n·K + j]] (W = 1 without HAS_W); Y (M, D) contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm, cm = rows < N, cols < D
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j in range(K):
        p = tl.load(POS + rows * K + j, mask=rm, other=0)
        y = tl.load(Y + p[:, None] * D + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(W + rows * swn + j * swk, mask=rm, other=0.0).to(tl.float32)
            y = y * w[:, None]
        acc += y
    tl.store(OUT + rows[:, None] * son + cols[None, :] * sod, acc.to(OUT.dtype.element_ty),
             mask=rm[:, None] & cm[None, :])


@triton.jit
def _topk_dy_kernel(DOUT, Y, ORDER, W, DY, DW, M, D, K, sdn, sdd, swn, swk,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per sorted slot p (token n, slot j): DY[p] = W[n, j] · dout[n]; DW[n, j] = dout[n] · Y[p]."""
    ps = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    pm = ps < M
    slot = tl.load(ORDER + ps, mask=pm, other=0)
    n, j = slot // K, slot % K
    w = tl.load(W + n * swn + j * swk, mask=pm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, D, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        m2 = pm[:, None] & (cols < D)[None, :]
        go = tl.load(DOUT + n[:, None] * sdn + cols[None, :] * sdd, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(Y + ps[:, None] * D + cols[None, :], mask=m2, other=0.0)
        acc += tl.sum(go * y, 1)
        tl.store(DY + ps[:, None] * D + cols[None, :], (go * w[:, None]).to(DY.dtype.element_ty), mask=m2)
    tl.store(DW + slot, acc.to(DW.dtype.element_ty), mask=pm)


@triton.jit
def _topk_dz_kernel(DY, Z, OFFS, TOFFS, W2, DZ, D, H, E, sw2e, sw2h, sw2d,
                    GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_E: tl.constexpr):
    e, rows, rm, valid = _tile_rows(OFFS, TOFFS, E, BLOCK_M, BLOCK_E)
    if valid:
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cm = cols < H
        acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < D
            dy = tl.load(DY + rows[:, None] * D + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            wt = tl.load(W2 + e * sw2e + cols[None, :] * sw2h + ks[:, None] * sw2d, mask=km[:, None] & cm[None, :],
                         other=0.0)
            acc += tl.dot(dy, wt, input_precision="ieee")
        m2 = rm[:, None] & cm[None, :]
        z = tl.load(Z + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
        tl.store(DZ + rows[:, None] * H + cols[None, :], (acc * _act_grad(z, GELU)).to(DZ.dtype.element_ty),
                 mask=m2)


@triton.jit
def _topk_dw2_kernel(Z, DY, OFFS, DW2, DB2, D, H,
                     GELU: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    nhb = tl.cdiv(H, BLOCK_H)
    e = tl.program_id(0) // nhb
    hb = tl.program_id(0) % nhb
    hs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hm, cm = hs < H, cols < D
    s0 = tl.load(OFFS + e)
    s1 = tl.load(OFFS + e + 1)
    acc = tl.zeros([BLOCK_H, BLOCK_N], dtype=tl.float32)
    accb = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(s0, s1, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        rm = rs < s1
        z = tl.load(Z + rs[:, None] * H + hs[None, :], mask=rm[:, None] & hm[None, :], other=0.0)
        dy = tl.load(DY + rs[:, None] * D + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        acc += tl.dot(tl.trans(_act(z, GELU).to(dy.dtype)), dy, input_precision="ieee")
        accb += tl.sum(dy.to(tl.float32), 0)
    tl.store(DW2 + (e * H + hs[:, None]) * D + cols[None, :], acc.to(DW2.dtype.element_ty),
             mask=hm[:, None] & cm[None, :])
    tl.store(DB2 + e * D + cols, accb.to(DB2.dtype.element_ty), mask=cm & (hb == 0))


@triton.jit
def _topk_dw1_kernel(X, ORDER, DZ, OFFS, DW1, DB1, D, H, K, sxn, sxd,
                     BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    nhb = tl.cdiv(H, BLOCK_H)
    e = tl.program_id(1) // nhb
    hs = (tl.program_id(1) % nhb) * BLOCK_H + tl.arange(0, BLOCK_H)
    ds = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    hm, dm = hs < H, ds < D
    s0 = tl.load(OFFS + e)
    s1 = tl.load(OFFS + e + 1)
    acc = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)
    accb = tl.zeros([BLOCK_H], dtype=tl.float32)
    for r0 in range(s0, s1, BLOCK_K):
        rs = r0 + tl.arange(0, BLOCK_K)
        rm = rs < s1
        tok = tl.load(ORDER + rs, mask=rm, other=0) // K
        xt = tl.load(X + tok[None, :] * sxn + ds[:, None] * sxd, mask=dm[:, None] & rm[None, :], other=0.0)
        dz = tl.load(DZ + rs[:, None] * H + hs[None, :], mask=rm[:, None] & hm[None, :], other=0.0)
        acc += tl.dot(xt, dz, input_precision="ieee")
        accb += tl.sum(dz.to(tl.float32), 0)
    tl.store(DW1 + (e * D + ds[:, None]) * H + hs[None, :], acc.to(DW1.dtype.element_ty),
             mask=dm[:, None] & hm[None, :])
    tl.store(DB1 + e * H + hs, accb.to(DB1.dtype.element_ty), mask=hm & (tl.program_id(0) == 0))


@triton.jit
def _topk_dxp_kernel(DZ, OFFS, TOFFS, W1, DXP, D, H, E, sw1e, sw1d, sw1h,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr):
    e, rows, rm, valid = _tile_rows(OFFS, TOFFS, E, BLOCK_M, BLOCK_E)
    if valid:
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        cm = cols < D
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            km = ks < H
            dz = tl.load(DZ + rows[:, None] * H + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            wt = tl.load(W1 + e * sw1e + cols[None, :] * sw1d + ks[:, None] * sw1h, mask=km[:, None] & cm[None, :],
                         other=0.0)
            acc += tl.dot(dz, wt, input_precision="ieee")
        tl.store(DXP + rows[:, None] * D + cols[None, :], acc, mask=rm[:, None] & cm[None, :])


# ============================================================================================ configs
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 16  # rows / output cols / reduction; all >= 16 for tl.dot on GPU
NUM_WARPS, NUM_STAGES = 8, 2  # 4 warps: 64x64 fp32 tiles (with 64-bit gather addresses) reach 255 regs / spill
DY_BLOCK_M = 32  # the elementwise dy/dweight kernel holds several 64-bit pointer tiles
# the unpermute gather: 64 x 64 tiles held 152-165 registers (64-bit gather addresses), over the 128 of the default
# occupancy budget (tests/test_aot.py); 32 x 32 at 4 warps holds 80-90
UNPERMUTE_BLOCK, UNPERMUTE_WARPS = 32, 4
DZ_BLOCK_H = 32  # dense dz: GEMM + act/act' epilogue + dgates partials spill at 64 wide (sm_90, 128 regs cap)
PERMUTE_BLOCK, PERMUTE_WARPS = 256, 8  # (BLOCK, BLOCK_E) one-hot tiles: 4 warps reach 255 regs at E = 64
MAX_EXPERTS = 64  # BLOCK_E of the permutation / tile lookup is next_pow2(E) <= 64
AOT_DTYPES = ("fp32", "bf16")  # fp16 takes the bf16 configs (same tiles, same MMA shapes)
AOT_BLOCK_E = (8, 64)


def _block_e(E: int) -> int:
    if E > MAX_EXPERTS:
        raise ValueError(f"the triton backend supports at most {MAX_EXPERTS} experts, got E = {E}")
    return max(2, 1 << (E - 1).bit_length())


def _aot_configs() -> list[dict]:
    out = []
    mn = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    mh = dict(BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_N, BLOCK_K=BLOCK_K)
    hn = dict(BLOCK_H=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    dh = dict(BLOCK_D=BLOCK_M, BLOCK_H=BLOCK_N, BLOCK_K=BLOCK_K)

    def add(kernel, name, types, c, warps=NUM_WARPS):
        out.append(dict(kernel=kernel, name=f"expert_mixture.{name}", constexprs=c, num_warps=warps,
                        num_stages=NUM_STAGES, signature=make_signature(kernel, types, c)))

    for dt in AOT_DTYPES:
        t, f32 = "*" + dt, "*fp32"
        add(_dense_fc1_kernel, f"dense_fc1.{dt}", dict(X=t, W1=t, B1=t, Z=f32), mh)
        add(_dense_dw1_kernel, f"dense_dw1.{dt}", dict(X=t, DZ=t, DW1=t, DB1=t), dh)
        add(_dense_dx_kernel, f"dense_dx.{dt}", dict(DZ=t, W1=t, DX=t), mn)
        add(_topk_dy_kernel, f"topk_dy.{dt}", dict(DOUT=t, Y=f32, ORDER="*i32", W=t, DY=t, DW=t),
            dict(BLOCK_M=DY_BLOCK_M, BLOCK_N=BLOCK_N))
        add(_topk_dw1_kernel, f"topk_dw1.{dt}", dict(X=t, ORDER="*i32", DZ=t, OFFS="*i32", DW1=t, DB1=t), dh)
        for has_w in (True, False):
            add(_unpermute_kernel, f"unpermute.w{int(has_w)}.{dt}", dict(Y=f32, POS="*i32", W=t, OUT=t),
                dict(HAS_W=has_w, BLOCK_M=UNPERMUTE_BLOCK, BLOCK_N=UNPERMUTE_BLOCK), warps=UNPERMUTE_WARPS)
        for be in AOT_BLOCK_E:
            add(_topk_fc1_kernel, f"topk_fc1.e{be}.{dt}",
                dict(X=t, ORDER="*i32", OFFS="*i32", TOFFS="*i32", W1=t, B1=t, Z=f32), dict(mh, BLOCK_E=be))
            add(_topk_dxp_kernel, f"topk_dxp.e{be}.{dt}", dict(DZ=t, OFFS="*i32", TOFFS="*i32", W1=t, DXP=f32),
                dict(mn, BLOCK_E=be))
        for gelu in (True, False):
            a = "gelu" if gelu else "relu"
            add(_dense_fc2_kernel, f"dense_fc2.{a}.{dt}", dict(Z=f32, G=t, W2=t, B2=t, OUT=t), dict(mn, GELU=gelu))
            add(_dense_dz_kernel, f"dense_dz.{a}.{dt}", dict(DOUT=t, W2=t, Z=f32, G=t, DZ=t, GPART=f32),
                dict(mh, BLOCK_H=DZ_BLOCK_H, GELU=gelu))
            add(_dense_dw2_kernel, f"dense_dw2.{a}.{dt}", dict(Z=f32, G=t, DOUT=t, DW2=t, DB2=t), dict(hn, GELU=gelu))
            add(_topk_dw2_kernel, f"topk_dw2.{a}.{dt}", dict(Z=f32, DY=t, OFFS="*i32", DW2=t, DB2=t),
                dict(hn, GELU=gelu))
            for be in AOT_BLOCK_E:
                add(_topk_fc2_kernel, f"topk_fc2.{a}.e{be}.{dt}",
                    dict(Z=f32, OFFS="*i32", TOFFS="*i32", W2=t, B2=t, Y=f32), dict(mn, GELU=gelu, BLOCK_E=be))
                add(_topk_dz_kernel, f"topk_dz.{a}.e{be}.{dt}",
                    dict(DY=t, Z=f32, OFFS="*i32", TOFFS="*i32", W2=t, DZ=t), dict(mh, GELU=gelu, BLOCK_E=be))
    for be in AOT_BLOCK_E:
        add(_permute_kernel, f"permute.e{be}", dict(IDX="*i64", ORDER="*i32", POS="*i32", OFFS="*i32",
                                                     TOFFS="*i32"),
            dict(TILE_M=BLOCK_M, BLOCK=PERMUTE_BLOCK, BLOCK_E=be), warps=PERMUTE_WARPS)
    return out


AOT_CONFIGS = _aot_configs()


# ============================================================================================ host launchers
def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend takes fp32 / fp16 / bf16 inputs, got {x.dtype}")


def _gelu(activation: str) -> bool:
    if activation not in ("gelu", "relu"):
        raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
    return activation == "gelu"


def dense_forward(x, gates, w1, b1, w2, b2, activation):
    """→ (out (N, d) in x.dtype, (Z (N, E, h) fp32,))."""
    _check_dtype(x)
    gelu = _gelu(activation)
    N, D = x.shape
    E, _, H = w1.shape
    z = torch.empty((N, E, H), dtype=torch.float32, device=x.device)
    out = torch.empty((N, D), dtype=x.dtype, device=x.device)
    if N == 0:
        return out, (z,)
    _dense_fc1_kernel[(triton.cdiv(N, BLOCK_M), E * triton.cdiv(H, BLOCK_N))](
        x, w1, b1, z, N, D, H, x.stride(0), x.stride(1), *w1.stride(), *b1.stride(),
        BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    _dense_fc2_kernel[(triton.cdiv(N, BLOCK_M), triton.cdiv(D, BLOCK_N))](
        z, gates, w2, b2, out, N, D, H, E, *gates.stride(), *w2.stride(), *b2.stride(), *out.stride(),
        GELU=gelu, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, (z,)


def dense_backward(x, gates, w1, b1, w2, b2, activation, saved, dout):
    """→ (dx, dgates, dw1, db1, dw2, db2), each in its input's dtype."""
    _check_dtype(x)
    gelu = _gelu(activation)
    (z,) = saved
    N, D = x.shape
    E, _, H = w1.shape
    dev, dt = x.device, x.dtype
    dw1 = torch.empty((E, D, H), dtype=dt, device=dev)
    db1 = torch.empty((E, H), dtype=dt, device=dev)
    dw2 = torch.empty((E, H, D), dtype=dt, device=dev)
    db2 = torch.empty((E, D), dtype=dt, device=dev)
    dx = torch.empty((N, D), dtype=dt, device=dev)
    if N == 0:
        return dx, torch.empty((0, E), dtype=dt, device=dev), dw1.zero_(), db1.zero_(), dw2.zero_(), db2.zero_()
    nhb = triton.cdiv(H, DZ_BLOCK_H)
    dz = torch.empty((N, E, H), dtype=dt, device=dev)
    gpart = torch.empty((N, E, nhb), dtype=torch.float32, device=dev)
    kw = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    _dense_dz_kernel[(triton.cdiv(N, BLOCK_M), E * nhb)](
        dout, w2, z, gates, dz, gpart, N, D, H, *dout.stride(), *w2.stride(), *gates.stride(),
        GELU=gelu, BLOCK_M=BLOCK_M, BLOCK_H=DZ_BLOCK_H, BLOCK_K=BLOCK_K, **kw)
    _dense_dw2_kernel[(E * triton.cdiv(H, BLOCK_M), triton.cdiv(D, BLOCK_N))](
        z, gates, dout, dw2, db2, N, D, H, *gates.stride(), *dout.stride(),
        GELU=gelu, BLOCK_H=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **kw)
    _dense_dw1_kernel[(triton.cdiv(D, BLOCK_M), E * triton.cdiv(H, BLOCK_N))](
        x, dz, dw1, db1, N, D, H, *x.stride(), BLOCK_D=BLOCK_M, BLOCK_H=BLOCK_N, BLOCK_K=BLOCK_K, **kw)
    _dense_dx_kernel[(triton.cdiv(N, BLOCK_M), triton.cdiv(D, BLOCK_N))](
        dz, w1, dx, N, D, H, E, *w1.stride(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **kw)
    dgates = (gpart.sum(-1) + dout.float() @ b2.float().t()).to(dt)
    return dx, dgates, dw1, db1, dw2, db2


def permute(expert_idx: torch.Tensor, num_experts: int, tile_m: int = BLOCK_M):
    """Device-side stable sort of the N·k slots by expert → (order, pos, offsets (E+1,), tile offsets (E+1,)),
    int32; ``order[p]`` = slot at sorted position p, ``pos[slot]`` = p."""
    M = expert_idx.numel()
    dev = expert_idx.device
    order = torch.empty(M, dtype=torch.int32, device=dev)
    pos = torch.empty(M, dtype=torch.int32, device=dev)
    offs = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    toffs = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    _permute_kernel[(1,)](expert_idx.reshape(-1).to(torch.int64).contiguous(), order, pos, offs, toffs, M,
                          num_experts, TILE_M=tile_m, BLOCK=PERMUTE_BLOCK, BLOCK_E=_block_e(num_experts),
                          num_warps=PERMUTE_WARPS)
    return order, pos, offs, toffs


def topk_forward(x, expert_idx, expert_weight, w1, b1, w2, b2, activation):
    """→ (out (N, d), (order, pos, offsets, tile offsets, Z (M, h) fp32, Y (M, d) fp32)), M = N·k."""
    _check_dtype(x)
    gelu = _gelu(activation)
    N, D = x.shape
    E, _, H = w1.shape
    K = expert_idx.shape[1]
    M = N * K
    be = _block_e(E)
    order, pos, offs, toffs = permute(expert_idx, E)
    z = torch.empty((M, H), dtype=torch.float32, device=x.device)
    y = torch.empty((M, D), dtype=torch.float32, device=x.device)
    out = torch.empty((N, D), dtype=x.dtype, device=x.device)
    saved = (order, pos, offs, toffs, z, y)
    if N == 0:
        return out, saved
    tiles = triton.cdiv(M, BLOCK_M) + E
    kw = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    _topk_fc1_kernel[(tiles, triton.cdiv(H, BLOCK_N))](
        x, order, offs, toffs, w1, b1, z, D, H, E, K, *x.stride(), *w1.stride(), *b1.stride(),
        BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_E=be, **kw)
    _topk_fc2_kernel[(tiles, triton.cdiv(D, BLOCK_N))](
        z, offs, toffs, w2, b2, y, D, H, E, *w2.stride(), *b2.stride(),
        GELU=gelu, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_E=be, **kw)
    _unpermute_kernel[(triton.cdiv(N, UNPERMUTE_BLOCK), triton.cdiv(D, UNPERMUTE_BLOCK))](
        y, pos, expert_weight, out, N, D, K, *expert_weight.stride(), *out.stride(),
        HAS_W=True, BLOCK_M=UNPERMUTE_BLOCK, BLOCK_N=UNPERMUTE_BLOCK, num_warps=UNPERMUTE_WARPS, num_stages=NUM_STAGES)
    return out, saved


def topk_backward(x, expert_idx, expert_weight, w1, b1, w2, b2, activation, saved, dout):
    """→ (dx, dexpert_weight, dw1, db1, dw2, db2)."""
    _check_dtype(x)
    gelu = _gelu(activation)
    order, pos, offs, toffs, z, y = saved
    N, D = x.shape
    E, _, H = w1.shape
    K = expert_idx.shape[1]
    M = N * K
    dev, dt = x.device, x.dtype
    be = _block_e(E)
    kw = dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    dx = torch.empty((N, D), dtype=dt, device=dev)
    dwt = torch.empty((N, K), dtype=dt, device=dev)
    dw1 = torch.empty((E, D, H), dtype=dt, device=dev)
    db1 = torch.empty((E, H), dtype=dt, device=dev)
    dw2 = torch.empty((E, H, D), dtype=dt, device=dev)
    db2 = torch.empty((E, D), dtype=dt, device=dev)
    if N == 0:
        return dx, dwt, dw1.zero_(), db1.zero_(), dw2.zero_(), db2.zero_()
    dy = torch.empty((M, D), dtype=dt, device=dev)
    dz = torch.empty((M, H), dtype=dt, device=dev)
    dxp = torch.empty((M, D), dtype=torch.float32, device=dev)
    tiles = triton.cdiv(M, BLOCK_M) + E
    _topk_dy_kernel[(triton.cdiv(M, DY_BLOCK_M),)](
        dout, y, order, expert_weight, dy, dwt, M, D, K, *dout.stride(), *expert_weight.stride(),
        BLOCK_M=DY_BLOCK_M, BLOCK_N=BLOCK_N, **kw)
    _topk_dz_kernel[(tiles, triton.cdiv(H, BLOCK_N))](
        dy, z, offs, toffs, w2, dz, D, H, E, *w2.stride(),
        GELU=gelu, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_E=be, **kw)
    _topk_dw2_kernel[(E * triton.cdiv(H, BLOCK_M), triton.cdiv(D, BLOCK_N))](
        z, dy, offs, dw2, db2, D, H, GELU=gelu, BLOCK_H=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **kw)
    _topk_dw1_kernel[(triton.cdiv(D, BLOCK_M), E * triton.cdiv(H, BLOCK_N))](
        x, order, dz, offs, dw1, db1, D, H, K, *x.stride(), BLOCK_D=BLOCK_M, BLOCK_H=BLOCK_N, BLOCK_K=BLOCK_K, **kw)
    _topk_dxp_kernel[(tiles, triton.cdiv(D, BLOCK_N))](
        dz, offs, toffs, w1, dxp, D, H, E, *w1.stride(), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        BLOCK_E=be, **kw)
    _unpermute_kernel[(triton.cdiv(N, UNPERMUTE_BLOCK), triton.cdiv(D, UNPERMUTE_BLOCK))](
        dxp, pos, dxp, dx, N, D, K, 0, 0, *dx.stride(), HAS_W=False, BLOCK_M=UNPERMUTE_BLOCK,
        BLOCK_N=UNPERMUTE_BLOCK, num_warps=UNPERMUTE_WARPS, num_stages=NUM_STAGES)
    return dx, dwt, dw1, db1, dw2, db2
