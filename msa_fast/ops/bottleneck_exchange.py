"""Modality tokens attend to their sample's bottleneck tokens, all modalities in one launch.

Each modality m has its own projection (k_m, v_m) of the K ≤ 16 bottleneck tokens; the query tokens of all
modalities are concatenated along the sequence axis and delimited by offsets. The reverse direction (bottleneck
queries over all modality tokens) is ``multi_source_attention``. Residual / LayerNorm handling lives in
``msa_fast.nn.BottleneckFusion``.

CPU routing under ``backend="auto"``: the C++ kernel (csrc/bottleneck_cpu.cpp, called with one tensor per
modality: no concatenation of the queries, no split of the outputs, delta formed in the backward kernel). With
K ≤ 16 keys it holds the whole k / v tile of a (b, h) in registers, computes a query row's K scores as D
broadcast-FMAs into one K-lane vector, and runs 4 rows in lockstep. Measured against the eager composition that
auto used before (``testing.reference.bottleneck_exchange_ref``: one matmul → softmax → matmul per modality), fp32,
2 threads, B = 16, H = 8, text / audio / vision 50 / 376 / 501, interleaved runs, paired median ratios eager / C++:
K = 8 or 4, D = 16 or 32, with and without ragged query padding, forward 2.6–9×, forward + backward 1.9–4.5× (e.g.
K = 8, D = 16 unmasked: fwd 5.4 → 1.5 ms, fwd+bwd 22.7 → 5.8 ms); at B = 32 (the bench suite's MOSI batch)
2.4–6×. The previous C++ kernel, built around the 64-key tiles of the general attention kernel, lost (K = 8 fwd 31
vs 37 ms, fwd+bwd 41 vs 78 ms): 7 of 8 key lanes were padding, plus a cat / stack / split and a separate delta
pass. So auto uses the kernel on CPU at every size (tiny shapes too: 3× at B = 2, a few tokens, where Python
overhead dominates both).
CUDA tensors use the one-launch Triton kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _dispatch
from ._core import BottleneckExchangeFn, check_float, check_mask, check_same, check_scale, offsets_of

MAX_BOTTLENECK = 16  # the Triton kernel keeps all K keys in one tile


class _BottleneckListFn(torch.autograd.Function):
    """The C++ kernel on one tensor per modality (``_cpp_backend.bottleneck_forward_list``): no torch.cat of the
    queries / torch.stack of the keys, no split of the outputs, and a backward that needs neither the output nor a
    separate delta = rowsum(dout ∘ out) pass (the kernel recomputes P from lse and forms delta itself)."""

    @staticmethod
    def forward(ctx, impl, M, key_valid, q_valids, scale, *tensors):
        qs, ks, vs = tensors[:M], tensors[M:2 * M], tensors[2 * M:]
        outs, lses = impl.forward_list(qs, ks, vs, key_valid, q_valids, scale)
        ctx.save_for_backward(*qs, *ks, *vs, *lses)
        ctx.impl, ctx.M, ctx.scale, ctx.key_valid = impl, M, scale, key_valid
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *douts):
        M = ctx.M
        saved = ctx.saved_tensors
        qs, ks, vs, lses = saved[:M], saved[M:2 * M], saved[2 * M:3 * M], saved[3 * M:]
        douts = [torch.zeros_like(q) if g is None else g for g, q in zip(douts, qs)]
        dqs, dks, dvs = ctx.impl.backward_list(qs, ks, vs, ctx.key_valid, ctx.scale, lses, douts)
        return (None, None, None, None, None, *dqs, *dks, *dvs)


def bottleneck_exchange(queries: Sequence[Tensor], keys: Sequence[Tensor], values: Sequence[Tensor],
                        query_padding_masks: Optional[Sequence[Optional[Tensor]]] = None,
                        key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                        backend: str = "auto") -> list[Tensor]:
    """queries[m] (B, H, L_m, D); keys[m], values[m] (B, H, K, D), K ≤ 16; query_padding_masks[m] (B, L_m) bool
    True = padding, or None; key_padding_mask (B, K) bool True = padding, shared by all modalities
    → [(B, H, L_m, D)]. Rows without a valid key give zeros; NaN / inf in q or k propagate as in
    ``testing.reference.bottleneck_exchange_ref`` (a NaN or +inf score on a valid key → NaN row)."""
    for what, seq in (("queries", queries), ("keys", keys), ("values", values)):
        if isinstance(seq, Tensor) or not hasattr(seq, "__len__") or len(seq) == 0:
            raise ValueError(f"{what} must be a non-empty list of tensors (one per modality)")
    M = len(queries)
    if len(keys) != M or len(values) != M:
        raise ValueError(f"queries, keys and values must have one entry per modality, got {M}, {len(keys)}, "
                         f"{len(values)}")
    q0 = check_float(queries[0], "queries[0]", 4, "(B, H, L_m, D)")
    B, H, _, D = q0.shape
    K = None
    for m in range(M):
        q = check_float(queries[m], f"queries[{m}]", 4, "(B, H, L_m, D)")
        k = check_float(keys[m], f"keys[{m}]", 4, "(B, H, K, D)")
        v = check_float(values[m], f"values[{m}]", 4, "(B, H, K, D)")
        for name, t in ((f"queries[{m}]", q), (f"keys[{m}]", k), (f"values[{m}]", v)):
            check_same(t, name, q0, "queries[0]")
        if q.shape[:2] != (B, H) or q.shape[3] != D:
            raise ValueError(f"queries[{m}] must be (B={B}, H={H}, L_m, D={D}), got {tuple(q.shape)}")
        K = k.shape[2] if K is None else K
        if k.shape != (B, H, K, D):
            raise ValueError(f"keys[{m}] must be (B={B}, H={H}, K={K}, D={D}), got {tuple(k.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"values[{m}] must have keys[{m}]'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if query_padding_masks is not None:
        if len(query_padding_masks) != M:
            raise ValueError(f"query_padding_masks must have {M} entries (None allowed), got {len(query_padding_masks)}")
        for m, mask in enumerate(query_padding_masks):
            if mask is not None:
                check_mask(mask, f"query_padding_masks[{m}]", (B, queries[m].shape[2]), q0.device)
    if key_padding_mask is not None:
        check_mask(key_padding_mask, "key_padding_mask", (B, K), q0.device)
    scale = check_scale(scale, D)
    name = _dispatch.resolve(backend, q0.device)
    if name == "cpp":
        impl = _dispatch.get("bottleneck_exchange", name)
        q_valids = ([None] * M if query_padding_masks is None
                    else [None if m is None else ~m for m in query_padding_masks])
        key_valid = None if key_padding_mask is None else ~key_padding_mask
        return list(_BottleneckListFn.apply(impl, M, key_valid, q_valids, scale, *queries, *keys, *values))
    if name == "triton" and K > MAX_BOTTLENECK:
        raise ValueError(f"keys: the Triton backend supports K ≤ {MAX_BOTTLENECK} bottleneck tokens, got K={K}")
    lengths = [q.shape[2] for q in queries]
    q = torch.cat(list(queries), dim=2).contiguous()
    k = torch.stack(list(keys), dim=2).contiguous()
    v = torch.stack(list(values), dim=2).contiguous()
    q_valid = None
    if query_padding_masks is not None and any(m is not None for m in query_padding_masks):
        q_valid = torch.cat([torch.ones(B, n, dtype=torch.bool, device=q.device) if m is None else ~m
                             for m, n in zip(query_padding_masks, lengths)], dim=1).contiguous()
    key_valid = None if key_padding_mask is None else (~key_padding_mask).contiguous()
    out = BottleneckExchangeFn.apply(q, k, v, key_valid, q_valid, offsets_of(lengths), scale,
                                     _dispatch.get("bottleneck_exchange", name))
    return list(torch.split(out, lengths, dim=2))
