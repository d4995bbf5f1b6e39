"""Cross-modal attention with key padding: ``attention(q, k, v, ...)``.

One source of the segmented-attention core (``multi_source_attention`` with S = 1) on the chosen backend.

CPU routing under ``backend="auto"`` (no ``use_backend`` / ``MSA_FAST_BACKEND`` override): inference calls (no
gradient needed) on fp32/fp64 CPU tensors with a head dim below 12 go to
``torch.nn.functional.scaled_dot_product_attention`` (boolean key mask, query padding applied afterwards) instead of
the C++ kernel, because ``msa-fast bench ops --full`` measured SDPA's forward faster there, and so do unmasked
training calls with D < 12 — both only over at least ``SDPA_SMALL_HEAD_DIM_MIN_KEYS`` (256) keys: over short key sets
(50-128) the C++ kernel measured 1.3-1.9x faster; masked training calls and D >= 16 use the C++ kernel, which
measured equal or faster (rules and numbers: ``msa_fast.ops.multi_source_attention``). torch >= 2.5 returns
zeros and finite gradients for fully masked rows in SDPA (tested). ``backend="cpp"`` always uses the C++ kernel.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..testing.reference import attention_ref
from . import _dispatch
from ._core import check_float, check_mask, check_same, check_scale, draw_seed, lengths_to_padding
from .multi_source_attention import run_sdpa, run_segmented, sdpa_route_applies


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              k_lengths: Optional[Tensor] = None, query_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """softmax(q·kᵀ·scale, masked)·v.

    q (B, H, Lq, D); k, v (B, H, Lk, D); key_padding_mask (B, Lk) bool, True = padding — or k_lengths (B,) int
    (keys at positions ≥ length are padding); query_padding_mask (B, Lq) bool, True = padding (zero output rows);
    scale defaults to D^-0.5; dropout_p > 0 applies dropout on the probabilities (C++ / Triton: inside the kernel
    with the counter RNG — the mask of ``testing.reference.dropout_keep_mask(seed, (B, H, Lq, Lk), p)``, seed
    drawn from torch's default generator; torch backend: the reference with ``F.dropout``) → (B, H, Lq, D).
    A query row with no valid key gives zeros, never NaN. NaN / ±inf in q or k propagate as in
    ``testing.reference.attention_ref``: a NaN or +inf score on a valid key makes that row NaN, a row whose valid
    scores are all −inf gives zeros, padded keys and padded query rows never matter.
    """
    check_float(q, "q", 4, "(B, H, Lq, D)")
    check_float(k, "k", 4, "(B, H, Lk, D)")
    check_float(v, "v", 4, "(B, H, Lk, D)")
    check_same(k, "k", q, "q")
    check_same(v, "v", q, "q")
    B, H, Lq, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must be (B={B}, H={H}, Lk, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Lk = k.shape[2]
    if key_padding_mask is not None and k_lengths is not None:
        raise ValueError("give key_padding_mask or k_lengths, not both")
    if k_lengths is not None:
        key_padding_mask = lengths_to_padding(k_lengths, "k_lengths", B, Lk, q.device)
    elif key_padding_mask is not None:
        check_mask(key_padding_mask, "key_padding_mask", (B, Lk), q.device)
    if query_padding_mask is not None:
        check_mask(query_padding_mask, "query_padding_mask", (B, Lq), q.device)
    scale = check_scale(scale, D)
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    name = _dispatch.resolve(backend, q.device)
    if dropout_p > 0.0:
        if getattr(_dispatch.get("attention", name), "supports_dropout", False):
            # in-kernel counter-RNG dropout (mask of testing.reference.dropout_keep_mask(seed, (B, H, Lq, Lk), p),
            # regenerated in backward: no (Lq, Lk) tensor is ever stored)
            return run_segmented(q, [(k, v, key_padding_mask)], scale, query_padding_mask, name,
                                 dropout=(float(dropout_p), draw_seed()))
        # backends without in-kernel dropout: the reference (torch RNG, autograd through it)
        return attention_ref(q, k, v, key_padding_mask, query_padding_mask, scale, float(dropout_p))
    unmasked = key_padding_mask is None and query_padding_mask is None
    if sdpa_route_applies(backend, name, q, [q, k, v], unmasked=unmasked):
        return run_sdpa(q, [(k, v, key_padding_mask)], scale, query_padding_mask)
    return run_segmented(q, [(k, v, key_padding_mask)], scale, query_padding_mask, name)
