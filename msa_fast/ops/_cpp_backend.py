"""Backend "cpp": the OPS_CONTRACT.md forward/backward on CPU tensors via the OpenMP extension ``msa_fast._C``.

The kernels run in float32 (float64 for float64 inputs, for gradcheck); fp16 / bf16 inputs are upcast here and the
results cast back. lse / o_src / delta are float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _ext


def _lib():
    lib = _ext.cpp_extension()
    if lib is None:
        raise RuntimeError("the C++ extension msa_fast._C is not built")
    return lib


def _kdtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _c(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, src_offsets: Sequence[int],
                      q_valid: Optional[Tensor], scale: float, dropout: Optional[tuple[float, int]] = None):
    """``dropout`` = (p, seed): in-kernel dropout on the probabilities with the counter RNG (csrc/counter_rng.h),
    element (b, h, i, j) drawing counter ((b·H + h)·Lq + i)·Lk + j — the mask of ``dropout_keep_mask(seed,
    (B, H, Lq, Lk), p)``."""
    dt = _kdtype(q)
    p, seed = dropout if dropout is not None else (0.0, 0)
    out, lse, o_src = _lib().attention_forward(
        _c(q, dt), _c(k, dt), _c(v, dt), key_valid.contiguous(), [int(o) for o in src_offsets],
        None if q_valid is None else q_valid.contiguous(), float(scale), float(p), int(seed))
    return out.to(q.dtype), lse, (o_src if len(src_offsets) > 2 else None)


def attention_backward(q, k, v, key_valid, src_offsets, q_valid, scale, lse, delta, dout, dropout=None):
    # q_valid is encoded in lse (+inf rows give P = 0), so the kernel does not need it
    dt = _kdtype(q)
    p, seed = dropout if dropout is not None else (0.0, 0)
    dq, dk, dv = _lib().attention_backward(
        _c(q, dt), _c(k, dt), _c(v, dt), key_valid.contiguous(), [int(o) for o in src_offsets], _c(lse, dt),
        _c(delta, dt), _c(dout, dt), float(scale), float(p), int(seed))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _key_valid(key_valid: Optional[Tensor], q: Tensor, k: Tensor) -> Tensor:
    if key_valid is None:
        return torch.ones(q.shape[0], k.shape[3], dtype=torch.bool)
    return key_valid.contiguous()


def bottleneck_forward(q: Tensor, q_offsets: Sequence[int], k: Tensor, v: Tensor, key_valid: Optional[Tensor],
                       q_valid: Optional[Tensor], scale: float):
    dt = _kdtype(q)
    out, lse = _lib().bottleneck_forward(_c(q, dt), [int(o) for o in q_offsets], _c(k, dt), _c(v, dt),
                                         _key_valid(key_valid, q, k),
                                         None if q_valid is None else q_valid.contiguous(), float(scale))
    return out.to(q.dtype), lse


def bottleneck_backward(q, q_offsets, k, v, key_valid, q_valid, scale, lse, delta, dout):
    dt = _kdtype(q)
    dq, dk, dv = _lib().bottleneck_backward(_c(q, dt), [int(o) for o in q_offsets], _c(k, dt), _c(v, dt),
                                            _key_valid(key_valid, q, k), _c(lse, dt), _c(delta, dt), _c(dout, dt),
                                            float(scale))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def bottleneck_forward_list(qs: Sequence[Tensor], ks: Sequence[Tensor], vs: Sequence[Tensor],
                            key_valid: Optional[Tensor], q_valids: Sequence[Optional[Tensor]], scale: float):
    """One tensor per modality (no concatenation): qs[m] (B, H, L_m, D), ks[m] / vs[m] (B, H, K, D), key_valid
    (B, K) bool or None (every key valid), q_valids[m] (B, L_m) bool or None → (outs [M], lses [M] (B, H, L_m))."""
    dt = _kdtype(qs[0])
    M = len(qs)
    res = _lib().bottleneck_forward_list([_c(q, dt) for q in qs], [_c(k, dt) for k in ks], [_c(v, dt) for v in vs],
                                         None if key_valid is None else key_valid.contiguous(),
                                         [None if m is None else m.contiguous() for m in q_valids], float(scale))
    return [o.to(q.dtype) for o, q in zip(res[:M], qs)], res[M:]


def bottleneck_backward_list(qs, ks, vs, key_valid, scale, lses, douts):
    """→ (dqs, dks, dvs), lists of M; delta = rowsum(dout ∘ out) is computed in the kernel (no ``out`` needed)."""
    dt = _kdtype(qs[0])
    M = len(qs)
    res = _lib().bottleneck_backward_list([_c(q, dt) for q in qs], [_c(k, dt) for k in ks], [_c(v, dt) for v in vs],
                                          None if key_valid is None else key_valid.contiguous(),
                                          [_c(x, dt) for x in lses], [_c(g, dt) for g in douts], float(scale))
    return ([g.to(q.dtype) for g, q in zip(res[:M], qs)], [g.to(k.dtype) for g, k in zip(res[M:2 * M], ks)],
            [g.to(v.dtype) for g, v in zip(res[2 * M:], vs)])


def masked_mean_forward(x: Tensor, valid: Tensor) -> Tensor:
    return _lib().masked_mean_forward(_c(x, _kdtype(x)), valid.contiguous()).to(x.dtype)


def masked_mean_backward(x: Tensor, valid: Tensor, dout: Tensor) -> Tensor:
    return _lib().masked_mean_backward(valid.contiguous(), _c(dout, _kdtype(x)), x.shape[1]).to(x.dtype)


attention = SimpleNamespace(forward=attention_forward, backward=attention_backward, supports_dropout=True)
bottleneck_exchange = SimpleNamespace(forward=bottleneck_forward, backward=bottleneck_backward,
                                      forward_list=bottleneck_forward_list, backward_list=bottleneck_backward_list)
masked_mean = SimpleNamespace(forward=masked_mean_forward, backward=masked_mean_backward)
