"""Fused dropout: ``dropout(x, p, training=True, seed=None, backend="auto")`` and its autograd Function.

Element n (row-major flat index of the contiguous tensor) is kept iff the counter RNG's bits(seed, n) ≥ floor(p·2³²)
(``msa_fast.testing.reference.dropout_keep_mask``); kept values are scaled by 1 / (1 − p). The C++ (CPU, fp32/fp64)
and Triton (CUDA, fp32/fp16/bf16) kernels draw bit-identical masks and regenerate them in backward, so only the seed
is saved. The "torch" backend (and dtypes a kernel does not take) is ``torch.nn.functional.dropout`` — the same
distribution from torch's own generator, not the same mask.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from . import _dispatch
from ._core import draw_seed


def _kernel(x: Tensor, name: str):
    """The fused ``apply(x, p, seed)`` for backend ``name`` and x's dtype, or None (→ F.dropout)."""
    if name == "cpp" and x.dtype in (torch.float32, torch.float64):
        return _ext.cpp_extension().dropout_apply
    if name == "triton" and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        from msa_fast.kernels import dropout as kernel
        return kernel.apply
    return None


class DropoutFn(torch.autograd.Function):
    """y = x · keep / (1 − p); dx = dy · keep / (1 − p) with the mask regenerated from the seed."""

    @staticmethod
    def forward(ctx, x, p, seed, apply):
        ctx.p, ctx.seed, ctx.kernel = p, seed, apply  # (not ctx.apply: the backward node has that method)
        return apply(x.contiguous(), p, seed)

    @staticmethod
    def backward(ctx, dy):
        return ctx.kernel(dy.contiguous(), ctx.p, ctx.seed), None, None, None


def dropout(x: Tensor, p: float = 0.5, training: bool = True, seed: Optional[int] = None,
            backend: str = "auto") -> Tensor:
    """Dropout of x (any shape). ``p`` ∈ [0, 1]; not ``training`` or p = 0 → x itself; p = 1 → zeros.
    ``seed`` (int in [0, 2⁶³)) pins the mask; None draws one from torch's default generator."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    p = float(p)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0  # keeps the graph: zero gradients
    name = _dispatch.resolve(backend, x.device)
    apply = _kernel(x, name)
    if apply is None:
        return torch.nn.functional.dropout(x, p, True)
    return DropoutFn.apply(x, p, draw_seed() if seed is None else seed, apply)
