"""Contract layer shared by the public ops: argument validation and one ``torch.autograd.Function`` per backend op.

The Functions call ``backend.forward`` / ``backend.backward`` (OPS_CONTRACT.md) and compute ``delta`` in torch.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------- validation
def check_float(t, name: str, ndim: int, shape_doc: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    return t


def check_same(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must match")


def check_mask(mask, name: str, shape: tuple, device: torch.device, meaning: str = "True = padding") -> Tensor:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape} ({meaning}), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor ({meaning}), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the inputs are on {device}")
    return mask


def lengths_to_padding(lengths, name: str, batch: int, max_len: int, device: torch.device) -> Tensor:
    """(B,) integer lengths → (B, max_len) bool padding mask (True = padding); rejects lengths outside 0..max_len."""
    if not isinstance(lengths, Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of shape ({batch},)")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > max_len):
        raise ValueError(f"{name} must lie in [0, {max_len}], got min {int(lengths.min())} max {int(lengths.max())}")
    return torch.arange(max_len, device=device)[None, :] >= lengths.to(device)[:, None]


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    scale = float(scale)
    if not scale == scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------- Functions
class SegmentedAttentionFn(torch.autograd.Function):
    """Σ_s softmax_s(q k_sᵀ·scale) v_s over S sources concatenated along the key axis (OPS_CONTRACT "attention")."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, q_valid, offsets, scale, impl, dropout=None):
        # dropout: None or (p, seed) for backends with ``supports_dropout``; the mask is regenerated in backward
        extra = {} if dropout is None else {"dropout": dropout}
        out, lse, o_src = impl.forward(q, k, v, key_valid, offsets, q_valid, scale, **extra)
        ctx.save_for_backward(q, k, v, key_valid, q_valid, out, lse, o_src)
        ctx.offsets, ctx.scale, ctx.impl, ctx.extra = offsets, scale, impl, extra
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, key_valid, q_valid, out, lse, o_src = ctx.saved_tensors
        dout = dout.contiguous()
        acc = acc_dtype(q)
        if o_src is None:
            delta = (dout.to(acc) * out.to(acc)).sum(-1).unsqueeze(2)  # (B, H, 1, Lq)
        else:
            delta = (dout.to(acc).unsqueeze(0) * o_src.to(acc)).sum(-1).permute(1, 2, 0, 3).contiguous()
        dq, dk, dv = ctx.impl.backward(q, k, v, key_valid, ctx.offsets, q_valid, ctx.scale, lse, delta, dout,
                                       **ctx.extra)
        return dq, dk, dv, None, None, None, None, None, None


class BottleneckExchangeFn(torch.autograd.Function):
    """Modality segments of q attend to their own projection of the K bottleneck tokens (OPS_CONTRACT)."""

    @staticmethod
    def forward(ctx, q, k, v, key_valid, q_valid, q_offsets, scale, impl):
        out, lse = impl.forward(q, q_offsets, k, v, key_valid, q_valid, scale)
        ctx.save_for_backward(q, k, v, key_valid, q_valid, out, lse)
        ctx.q_offsets, ctx.scale, ctx.impl = q_offsets, scale, impl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, key_valid, q_valid, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        acc = acc_dtype(q)
        delta = (dout.to(acc) * out.to(acc)).sum(-1).contiguous()
        dq, dk, dv = ctx.impl.backward(q, ctx.q_offsets, k, v, key_valid, q_valid, ctx.scale, lse, delta, dout)
        return dq, dk, dv, None, None, None, None, None


class MaskedMeanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, valid, impl):
        ctx.save_for_backward(x, valid)
        ctx.impl = impl
        return impl.forward(x, valid)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, valid = ctx.saved_tensors
        return ctx.impl.backward(x, valid, dout.contiguous()), None, None


def draw_seed() -> int:
    """A 63-bit seed for the counter-based RNG of the fused kernels, drawn from torch's default CPU generator (so
    ``torch.manual_seed`` makes fused dropout reproducible, as it does ``F.dropout``)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def offsets_of(lengths: Sequence[int]) -> tuple[int, ...]:
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + int(n))
    return tuple(offs)


def valid_or_none(padding: Optional[Tensor]) -> Optional[Tensor]:
    return None if padding is None else (~padding).contiguous()
