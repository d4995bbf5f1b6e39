"""Backend "torch": the OPS_CONTRACT.md forward/backward in plain PyTorch (the eager matmul → softmax → matmul path).

It materialises each (Lq, L_s) score block, so it is the memory-hungry baseline; it runs on any device and dtype.
Accumulation is float32 (float64 for float64 inputs, so gradcheck works); lse / o_src / delta use that dtype.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import Tensor


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _block_fwd(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """q (B,H,Lq,D), k/v (B,H,L,D) (acc dtype), key_valid (B,L) → normalised out (B,H,Lq,D), lse (B,H,Lq)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where no valid key (or every valid score is -inf)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    # a NaN / +inf score on a valid key: NaN row (output and lse), as the reference's masked softmax
    lse = lse.masked_fill(~(s < float("inf")).all(dim=-1), float("nan"))
    p = torch.exp(s - lse[..., None])  # +inf lse → 0, NaN lse → NaN
    return torch.matmul(p, v), lse


def _block_bwd(q, k, v, key_valid, scale, lse, delta, dout):
    """Gradients of one softmax block given its lse / delta (B,H,Lq) → dq, dk, dv (acc dtype)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    kv = key_valid[:, None, None, :]
    s = s.masked_fill(~kv, float("-inf"))
    p = torch.exp(s - lse[..., None]).masked_fill(~kv, 0.0)  # NaN rows (NaN lse): NaN on valid keys, 0 on masked
    dv = torch.matmul(p.transpose(-1, -2), dout)
    dp = torch.matmul(dout, v.transpose(-1, -2))
    ds = (p * (dp - delta[..., None]) * scale).masked_fill(~kv, 0.0)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv


def _mask_rows(x: Tensor, q_valid: Optional[Tensor], fill: float, row_dim_last: bool = False) -> Tensor:
    if q_valid is None:
        return x
    m = ~q_valid[:, None, :] if row_dim_last else ~q_valid[:, None, :, None]
    return x.masked_fill(m, fill)


def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, src_offsets: Sequence[int],
                      q_valid: Optional[Tensor], scale: float):
    acc = _acc_dtype(q)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    outs, lses = [], []
    for a, b in zip(src_offsets[:-1], src_offsets[1:]):
        o, lse = _block_fwd(qa, ka[:, :, a:b], va[:, :, a:b], key_valid[:, a:b], scale)
        outs.append(_mask_rows(o, q_valid, 0.0))
        lses.append(_mask_rows(lse, q_valid, float("inf"), row_dim_last=True))
    o_src = torch.stack(outs) if len(outs) > 1 else None
    out = (o_src.sum(0) if o_src is not None else outs[0]).to(q.dtype)
    return out, torch.stack(lses, dim=2), o_src


def attention_backward(q, k, v, key_valid, src_offsets, q_valid, scale, lse, delta, dout):
    acc = _acc_dtype(q)
    qa, ka, va, g = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    dq = torch.zeros_like(qa)
    dks, dvs = [], []
    for s, (a, b) in enumerate(zip(src_offsets[:-1], src_offsets[1:])):
        dq_s, dk_s, dv_s = _block_bwd(qa, ka[:, :, a:b], va[:, :, a:b], key_valid[:, a:b], scale,
                                      lse[:, :, s].to(acc), delta[:, :, s].to(acc), g)
        dq += dq_s
        dks.append(dk_s)
        dvs.append(dv_s)
    return dq.to(q.dtype), torch.cat(dks, 2).to(k.dtype), torch.cat(dvs, 2).to(v.dtype)


def bottleneck_forward(q: Tensor, q_offsets: Sequence[int], k: Tensor, v: Tensor, key_valid: Optional[Tensor],
                       q_valid: Optional[Tensor], scale: float):
    acc = _acc_dtype(q)
    B, K = q.shape[0], k.shape[3]
    kv = torch.ones(B, K, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    outs, lses = [], []
    for m, (a, b) in enumerate(zip(q_offsets[:-1], q_offsets[1:])):
        o, lse = _block_fwd(q[:, :, a:b].to(acc), k[:, :, m].to(acc), v[:, :, m].to(acc), kv, scale)
        outs.append(o)
        lses.append(lse)
    out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
    return _mask_rows(out, q_valid, 0.0).to(q.dtype), _mask_rows(lse, q_valid, float("inf"), row_dim_last=True)


def bottleneck_backward(q, q_offsets, k, v, key_valid, q_valid, scale, lse, delta, dout):
    acc = _acc_dtype(q)
    B, K = q.shape[0], k.shape[3]
    kv = torch.ones(B, K, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    dqs, dks, dvs = [], [], []
    for m, (a, b) in enumerate(zip(q_offsets[:-1], q_offsets[1:])):
        dq, dk, dv = _block_bwd(q[:, :, a:b].to(acc), k[:, :, m].to(acc), v[:, :, m].to(acc), kv, scale,
                                lse[:, :, a:b].to(acc), delta[:, :, a:b].to(acc), dout[:, :, a:b].to(acc))
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
    return torch.cat(dqs, 2).to(q.dtype), torch.stack(dks, 2).to(k.dtype), torch.stack(dvs, 2).to(v.dtype)


def masked_mean_forward(x: Tensor, valid: Tensor) -> Tensor:
    # where, not x * w: a NaN / inf at a padded position is ignored (0 * NaN would be NaN)
    w = valid.to(_acc_dtype(x)).unsqueeze(-1)
    xs = torch.where(valid.unsqueeze(-1), x.to(w.dtype), 0.0)
    return (xs.sum(1) / w.sum(1).clamp_min(1.0)).to(x.dtype)


def masked_mean_backward(x: Tensor, valid: Tensor, dout: Tensor) -> Tensor:
    w = valid.to(_acc_dtype(x)).unsqueeze(-1)
    return (dout.to(w.dtype).unsqueeze(1) * w / w.sum(1, keepdim=True).clamp_min(1.0)).to(x.dtype)


attention = SimpleNamespace(forward=attention_forward, backward=attention_backward)
bottleneck_exchange = SimpleNamespace(forward=bottleneck_forward, backward=bottleneck_backward)
masked_mean = SimpleNamespace(forward=masked_mean_forward, backward=masked_mean_backward)
