"""HME in-batch threshold retrieval (op "hme_retrieval"): one fused kernel, no B×B storage, no host sync.

For unit-normalised rows HN (B, D), values V (B, DV) and column weights W (B,) the kernel computes

    OUT_i = Σ_j [HN_i·HN_j ≥ α, j ≠ i] · W_j · V_j        (B, DV) fp32
    CNT_i = Σ_j [HN_i·HN_j ≥ α, j ≠ i] · W_j              (B,)    fp32

with one program per (row block, DV chunk): a tiled GEMM builds the similarity tile in registers, the threshold and
diagonal mask turn it into the 0/W weights, and a second GEMM accumulates them against V in the same column loop.
The forward pass of the op is (V = H, W = availability); because the similarity and the threshold are symmetric, the
backward pass is the same kernel with V = dR / count and W = 1 (see ``msa_fast.retrieval.in_batch``).
The division by the count and HME's fallback rule are cheap (B,)-sized torch ops on the host side.

Both dots run in fp32 with ``input_precision="ieee"``: TF32 could flip a near-threshold neighbour decision, and the
0/1 weights times V must stay exact. B is the mini-batch (≤ a few thousand), so the kernel is latency-bound anyway.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import TRITON_DTYPE, make_signature


@triton.jit
def _hme_retrieval_kernel(HN, V, W, OUT, CNT, B, D, DV, s_hn, s_v, s_out, threshold,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_dv = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = pid_dv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_k0 = tl.arange(0, BLOCK_K)
    row_in = rows < B
    dv_in = offs_dv < DV
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_in = cols < B
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + offs_k0
            k_in = offs_k < D
            q = tl.load(HN + rows[:, None] * s_hn + offs_k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
            kt = tl.load(HN + cols[None, :] * s_hn + offs_k[:, None], mask=k_in[:, None] & col_in[None, :],
                         other=0.0)
            s += tl.dot(q, kt, input_precision="ieee")
        w = tl.load(W + cols, mask=col_in, other=0.0)
        keep = (s >= threshold) & (rows[:, None] != cols[None, :]) & col_in[None, :]
        m = tl.where(keep, w[None, :], 0.0)
        cnt += tl.sum(m, 1)
        v = tl.load(V + cols[:, None] * s_v + offs_dv[None, :], mask=col_in[:, None] & dv_in[None, :], other=0.0)
        acc += tl.dot(m, v.to(tl.float32), input_precision="ieee")
    tl.store(OUT + rows[:, None] * s_out + offs_dv[None, :], acc, mask=row_in[:, None] & dv_in[None, :])
    tl.store(CNT + rows, cnt, mask=row_in & (pid_dv == 0))


# Hand-picked (never autotuned, see kernels/__init__.py). Every tl.dot dim >= 16 so the GPU backends accept it.
BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_DV = 32, 32, 32, 64
NUM_WARPS, NUM_STAGES = 8, 2  # AOT-checked: 104 (sm_80) / 108 (sm_90a) registers, 0 spills; 4 warps spilled
V_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _constexprs() -> dict:
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_DV=BLOCK_DV)


def _aot_configs() -> list[dict]:
    c = _constexprs()
    out = []
    for dt in V_DTYPES:
        t = TRITON_DTYPE[dt]
        sig = make_signature(_hme_retrieval_kernel, dict(HN="*fp32", V="*" + t, W="*fp32", OUT="*fp32",
                                                         CNT="*fp32", threshold="fp32"), c)
        out.append(dict(kernel=_hme_retrieval_kernel, name=f"hme_retrieval.{t}", signature=sig, constexprs=c,
                        num_warps=NUM_WARPS, num_stages=NUM_STAGES))
    return out


AOT_CONFIGS = _aot_configs()


def thresholded_row_sum(hn: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
                        threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher. hn (B, D) fp32 unit rows, v (B, DV) fp32/fp16/bf16, w (B,) fp32 column weights.

    → (out (B, DV) fp32, cnt (B,) fp32) as in the module docstring. Inputs are made contiguous here.
    """
    if hn.dim() != 2 or v.dim() != 2 or w.dim() != 1 or not (hn.shape[0] == v.shape[0] == w.shape[0]):
        raise ValueError(f"expected hn (B, D), v (B, DV), w (B,), got {tuple(hn.shape)}, {tuple(v.shape)}, "
                         f"{tuple(w.shape)}")
    if v.dtype not in V_DTYPES:
        raise TypeError(f"v must be fp32/fp16/bf16, got {v.dtype}")
    hn = hn.to(torch.float32).contiguous()
    v = v.contiguous()
    w = w.to(torch.float32).contiguous()
    b, d = hn.shape
    dv = v.shape[1]
    out = torch.empty((b, dv), dtype=torch.float32, device=hn.device)
    cnt = torch.empty((b,), dtype=torch.float32, device=hn.device)
    if b == 0:
        return out, cnt
    grid = (triton.cdiv(b, BLOCK_M), triton.cdiv(dv, BLOCK_DV))
    _hme_retrieval_kernel[grid](hn, v, w, out, cnt, b, d, dv, hn.stride(0), v.stride(0), out.stride(0),
                                float(threshold), **_constexprs(), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return out, cnt
