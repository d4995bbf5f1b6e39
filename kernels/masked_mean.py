"""Masked mean over the sequence dim (op "masked_mean"): x (B, L, D), valid (B, L) bool (True = valid) → (B, D).

Forward: one program per (sample, D chunk) streams L in chunks, accumulating the valid rows' sum and count in fp32;
an empty row gives zeros. Backward: dx[b, l] = valid[b, l] * dout[b] / max(count_b, 1), one program per
(sample, L chunk, D chunk) recounting the row (L is short; saves a launch and a buffer).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import as_u8, make_signature


@triton.jit
def _mm_fwd_kernel(X, VALID, OUT, L, D, sxb, sxl, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    offs_l0 = tl.arange(0, BLOCK_L)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + offs_l0
        ok = (tl.load(VALID + b * L + offs_l, mask=offs_l < L, other=0) != 0) & (offs_l < L)
        x = tl.load(X + b * sxb + offs_l[:, None] * sxl + offs_d[None, :], mask=ok[:, None] & d_in[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
        cnt += ok.to(tl.float32)
    n = tl.maximum(tl.sum(cnt, 0), 1.0)
    tl.store(OUT + b * D + offs_d, (acc / n).to(OUT.dtype.element_ty), mask=d_in)


@triton.jit
def _mm_bwd_kernel(VALID, DOUT, DX, L, D, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_l0 = tl.arange(0, BLOCK_L)
    offs_l = tl.program_id(1) * BLOCK_L + offs_l0
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    l_in = offs_l < L
    d_in = offs_d < D
    cnt = tl.zeros([BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        idx = l0 + offs_l0
        cnt += (tl.load(VALID + b * L + idx, mask=idx < L, other=0) != 0).to(tl.float32)
    n = tl.maximum(tl.sum(cnt, 0), 1.0)
    ok = tl.load(VALID + b * L + offs_l, mask=l_in, other=0) != 0
    g = tl.load(DOUT + b * D + offs_d, mask=d_in, other=0.0).to(tl.float32) / n
    dx = tl.where(ok[:, None], g[None, :], 0.0)
    tl.store(DX + (b * L + offs_l[:, None]) * D + offs_d[None, :], dx.to(DX.dtype.element_ty),
             mask=l_in[:, None] & d_in[None, :])


BLOCK_L, BLOCK_D = 64, 64  # no tl.dot here: any power of two works; 64x64 keeps a chunk at 16-32 regs/thread
NUM_WARPS, NUM_STAGES = 4, 2  # passed at launch too: Triton's default num_stages (3) would be another variant
AOT_DTYPES = ("fp32", "bf16")


def _aot_configs() -> list[dict]:
    out = []
    c = dict(BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D)
    for dt in AOT_DTYPES:
        t = "*" + dt
        out.append(dict(kernel=_mm_fwd_kernel, name=f"masked_mean.fwd.{dt}", constexprs=c, num_warps=NUM_WARPS,
                        num_stages=NUM_STAGES,
                        signature=make_signature(_mm_fwd_kernel, dict(X=t, VALID="*u8", OUT=t), c)))
        out.append(dict(kernel=_mm_bwd_kernel, name=f"masked_mean.bwd.{dt}", constexprs=c, num_warps=NUM_WARPS,
                        num_stages=NUM_STAGES,
                        signature=make_signature(_mm_bwd_kernel, dict(VALID="*u8", DOUT=t, DX=t), c)))
    return out


AOT_CONFIGS = _aot_configs()


def _check(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32/fp16/bf16, got {x.dtype}")
    B, L, _ = x.shape
    if valid is None:
        return torch.ones((B, L), dtype=torch.uint8, device=x.device)
    if tuple(valid.shape) != (B, L):
        raise ValueError(f"valid must have shape {(B, L)}, got {tuple(valid.shape)}")
    return as_u8(valid)


def forward(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """x (B, L, D), valid (B, L) bool (True = valid; None = all) → mean over valid rows (B, D); empty rows → 0."""
    vu8 = _check(x, valid)
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, L, D = x.shape
    out = torch.empty((B, D), dtype=x.dtype, device=x.device)
    if B * D > 0:
        _mm_fwd_kernel[(B, triton.cdiv(D, BLOCK_D))](x, vu8, out, L, D, x.stride(0), x.stride(1),
                                                     BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
                                                     num_stages=NUM_STAGES)
    return out


def backward(x: torch.Tensor, valid: Optional[torch.Tensor], dout: torch.Tensor) -> torch.Tensor:
    """dout (B, D) → dx (B, L, D) in x.dtype (only x's shape/dtype are used)."""
    vu8 = _check(x, valid)
    B, L, D = x.shape
    if tuple(dout.shape) != (B, D):
        raise ValueError(f"dout must have shape {(B, D)}, got {tuple(dout.shape)}")
    dout = dout.contiguous()
    dx = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    if dx.numel() > 0:
        grid = (B, triton.cdiv(L, BLOCK_L), triton.cdiv(D, BLOCK_D))
        _mm_bwd_kernel[grid](vu8, dout, dx, L, D, BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
                             num_stages=NUM_STAGES)
    return dx
