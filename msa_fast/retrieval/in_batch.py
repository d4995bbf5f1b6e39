"""HME's in-batch cross-sample retrieval (``HME.get_similar_embeddings``) as one sync-free op.

Official rule, per modality, over the mini-batch H (B, D) (method_hme.md §4):

* cos_ij = cosine(H_i, H_j), diagonal excluded;
* neighbours of i = {j : cos_ij ≥ α} (α = 0.6); R_i = unweighted mean of the neighbours' H_j;
* fallback: if the entry sum of H_i is exactly 0 **or** i has no neighbour, R_i = mean of all rows whose entry sum
  ≠ 0 (i itself included);
* no detach: gradients flow into the neighbours' (and the fallback rows') embeddings; the neighbour selection is
  piecewise constant, so nothing flows through the cosine.

The official loop does one ``nonzero()`` per row (B host syncs per modality); here it is R = W·H with W the row-
normalised neighbour matrix, computed by masked GEMMs (torch backend) or by one fused Triton kernel that never stores
the B×B matrix (``msa_fast.kernels.hme_retrieval``).

``available`` (optional, msa_fast extension): rows whose modality is missing are never retrieved, neither as a
neighbour nor in the fallback mean; they still query. ``available=None`` reproduces the official behaviour, in which
missing modalities (zeroed inputs → a constant encoder output) retrieve each other.
An empty candidate set (every row missing or of zero sum) gives R = 0 for the fallback rows instead of the official
NaN.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")
_COS_EPS = 1e-8  # F.cosine_similarity's eps: zero rows get cosine 0 with everything


def in_batch_retrieve(h: Tensor, available: Optional[Tensor] = None, threshold: float = 0.6,
                      backend: str = "auto", return_similarity: bool = False) -> tuple[Tensor, dict]:
    """HME retrieval over the batch: h (B, D) float, available (B,) bool or None → (R (B, D), info).

    info: ``count`` (B,) int64 neighbours per row, ``fallback`` (B,) bool rows that took the fallback mean, and with
    ``return_similarity=True`` (torch backend only) ``cos`` (B, B) with −inf diagonal and ``neighbours`` (B, B) bool,
    as in the official code. ``backend``: "torch", "triton" (CUDA tensors, or CPU under TRITON_INTERPRET=1) or
    "auto" (triton on CUDA when triton imports, else torch). Differentiable w.r.t. ``h`` like the official code.
    """
    _check(h, available, threshold, backend)
    backend = _resolve_backend(backend, h)
    if return_similarity and backend != "torch":
        raise ValueError("return_similarity=True needs backend='torch' (the triton kernel never forms the B×B matrix)")
    avail = None if available is None else available.to(device=h.device, dtype=torch.bool)
    if backend == "torch":
        return _torch_retrieve(h, avail, threshold, return_similarity)
    return _apply_triton(h, avail, float(threshold))


def official_loop_retrieve(h: Tensor, threshold: float = 0.6) -> Tensor:
    """Plain per-row loop of the official rule (test reference; B host syncs). h (B, D) → R (B, D)."""
    cos = F.cosine_similarity(h[:, None, :], h[None, :, :], dim=-1)
    cos = cos.fill_diagonal_(float("-inf"))
    nonzero_rows = h.sum(dim=1) != 0
    out = []
    for i in range(h.shape[0]):
        idx = (cos[i] >= threshold).nonzero().flatten()
        if h[i].sum() == 0 or idx.numel() == 0:
            out.append(h[nonzero_rows].mean(dim=0))
        else:
            out.append(h[idx].mean(dim=0))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
def _check(h: Tensor, available: Optional[Tensor], threshold: float, backend: str) -> None:
    if not isinstance(h, Tensor) or h.dim() != 2:
        raise ValueError(f"h must be a (B, D) tensor, got {getattr(h, 'shape', type(h))}")
    if not h.is_floating_point():
        raise TypeError(f"h must be floating point, got {h.dtype}")
    if available is not None:
        if tuple(available.shape) != (h.shape[0],):
            raise ValueError(f"available must have shape ({h.shape[0]},), got {tuple(available.shape)}")
        if available.dtype != torch.bool:
            raise TypeError(f"available must be a bool tensor, got {available.dtype}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a cosine in [-1, 1], got {threshold}")


def _resolve_backend(backend: str, h: Tensor) -> str:
    if backend != "auto":
        if backend == "triton" and not (h.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return backend
    if h.is_cuda:
        try:
            import triton  # noqa: F401
            return "triton"
        except ImportError:
            pass
    return "torch"


def _fallback(h: Tensor, avail: Optional[Tensor], count: Tensor) -> tuple[Tensor, Tensor]:
    """(fallback rows (B,) bool, weights (B,) over the rows averaged for them; sums to 1, or 0 if none qualify)."""
    row_sum = h.detach().sum(dim=1)
    candidates = row_sum != 0
    if avail is not None:
        candidates = candidates & avail
    fallback = (row_sum == 0) | (count == 0)
    weights = candidates.to(h.dtype) / candidates.sum().clamp_min(1).to(h.dtype)
    return fallback, weights


def _torch_retrieve(h: Tensor, avail: Optional[Tensor], threshold: float,
                    return_similarity: bool) -> tuple[Tensor, dict]:
    hn = F.normalize(h.detach().float(), dim=1, eps=_COS_EPS)
    cos = hn @ hn.T
    cos.fill_diagonal_(float("-inf"))
    neighbours = cos >= threshold
    if avail is not None:
        neighbours = neighbours & avail[None, :]
    count = neighbours.sum(dim=1)
    fallback, fb_weights = _fallback(h, avail, count)
    weights = neighbours.to(h.dtype) / count.clamp_min(1)[:, None].to(h.dtype)
    weights = torch.where(fallback[:, None], fb_weights[None, :], weights)  # (B, B) rows sum to 1 (or 0)
    r = weights @ h
    info = {"count": count, "fallback": fallback}
    if return_similarity:
        info.update(cos=cos, neighbours=neighbours)
    return r, info


class _TritonRetrieve(torch.autograd.Function):
    """R = W·H with W never materialised: dH = Wᵀ·dR = avail ⊙ (T·(dR/c) restricted to non-fallback rows) + fallback
    term, where T (the thresholded similarity, diagonal excluded) is symmetric, so the same kernel serves both ways."""

    @staticmethod
    def forward(ctx, h: Tensor, avail: Optional[Tensor], threshold: float):  # type: ignore[override]
        from msa_fast.kernels.hme_retrieval import thresholded_row_sum

        hn = F.normalize(h.detach().float(), dim=1, eps=_COS_EPS)
        w = torch.ones(h.shape[0], device=h.device) if avail is None else avail.float()
        v = h.detach() if h.dtype in (torch.float16, torch.bfloat16) else h.detach().float()  # fp64 → fp32 kernel
        num, cnt = thresholded_row_sum(hn, v, w, threshold)
        count = cnt.round().long()
        fallback, fb_weights = _fallback(h, avail, count)
        fb_vec = fb_weights[None, :].float() @ h.detach().float()  # (1, D)
        r = torch.where(fallback[:, None], fb_vec, num / cnt.clamp_min(1.0)[:, None])
        ctx.save_for_backward(hn, w, cnt, fallback, fb_weights)
        ctx.threshold = threshold
        ctx.mark_non_differentiable(count, fallback)
        return r.to(h.dtype), count, fallback

    @staticmethod
    def backward(ctx, grad_r: Tensor, _gc, _gf):  # type: ignore[override]
        from msa_fast.kernels.hme_retrieval import thresholded_row_sum

        hn, w, cnt, fallback, fb_weights = ctx.saved_tensors
        g = grad_r.float()
        scaled = torch.where(fallback[:, None], 0.0, g / cnt.clamp_min(1.0)[:, None])
        back, _ = thresholded_row_sum(hn, scaled, torch.ones_like(w), ctx.threshold)
        dh = back * w[:, None] + fb_weights.float()[:, None] * (g * fallback[:, None]).sum(dim=0, keepdim=True)
        return dh.to(grad_r.dtype), None, None


def _apply_triton(h: Tensor, avail: Optional[Tensor], threshold: float) -> tuple[Tensor, dict]:
    r, count, fallback = _TritonRetrieve.apply(h, avail, threshold)
    return r, {"count": count, "fallback": fallback}
