"""Fused dropout (op "dropout"): y = x · keep(seed, n) / (1 − p) over the row-major flat index n, with the counter
RNG of ``counter_rng.py`` (bit-identical to the C++ kernel and ``testing.reference.dropout_keep_mask``). The same
launch computes the backward on the incoming gradient: the mask is regenerated, never stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import make_signature
from .counter_rng import SEED_PARAMS, dropout_args, flat_dropout_scale

BLOCK = 1024


@triton.jit(do_not_specialize=SEED_PARAMS)
def _dropout_kernel(X, Y, N, seed_lo: tl.int64, seed_hi: tl.int64, keep_thr: tl.int64, inv_keep,
                    BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: tensors beyond 2³¹ elements
    n = start + tl.arange(0, BLOCK)
    ok = n < N
    x = tl.load(X + n, mask=ok, other=0.0)
    z = flat_dropout_scale(n, seed_lo, seed_hi, keep_thr, inv_keep)
    tl.store(Y + n, (x.to(tl.float32) * z).to(Y.dtype.element_ty), mask=ok)


AOT_CONFIGS = [
    dict(kernel=_dropout_kernel, name=f"dropout.{dt}",
         signature=make_signature(_dropout_kernel, {"X": f"*{dt}", "Y": f"*{dt}", "N": "i64", "seed_lo": "i64",
                                                    "seed_hi": "i64", "keep_thr": "i64", "inv_keep": "fp32"},
                                  {"BLOCK": BLOCK}),
         constexprs={"BLOCK": BLOCK}, num_warps=4, num_stages=1)
    for dt in ("fp32", "fp16", "bf16")
]


def apply(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x (any shape; fp32 / fp16 / bf16) → x · keep / (1 − p), keep drawn from (seed, flat index)."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32 / fp16 / bf16, got {x.dtype}")
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        _dropout_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, *dropout_args((p, seed)), BLOCK=BLOCK, num_warps=4,
                                                   num_stages=1)
    return y
