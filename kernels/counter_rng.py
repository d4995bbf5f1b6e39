"""Counter-based RNG for in-kernel dropout: bit-identical to csrc/counter_rng.h and
``msa_fast.testing.reference.counter_rng_bits`` (so Triton, C++ and the reference draw the same mask for a seed).

bits(seed, n) = fmix32(fmix32(lo32(n) ^ lo32(seed)) ^ hi32(seed) ^ hi32(n)·0x9E3779B1), all mod 2³² (uint32 tensors
wrap on multiply, shifts are logical); element n is kept iff bits ≥ floor(p·2³²).
"""
from __future__ import annotations

import triton
import triton.language as tl

from msa_fast.testing.reference import dropout_keep_threshold


@triton.jit
def fmix32(h):
    h ^= h >> 16
    h = h * 0x85EBCA6B
    h ^= h >> 13
    h = h * 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def row_counter(row, Lk):
    """(lo, hi) uint32 halves of the counter of (row, key 0) = row·Lk (row: int tensor of global row ids)."""
    n = row.to(tl.int64) * Lk
    return n.to(tl.uint32), (n >> 32).to(tl.uint32)


@triton.jit
def keep_bits(lo, hi, seed_lo, seed_hi):
    """bits(seed, n) for uint32 counter halves lo / hi (seed halves: int64 scalars in [0, 2³²))."""
    return fmix32(fmix32(lo ^ seed_lo.to(tl.uint32)) ^ (seed_hi.to(tl.uint32) ^ (hi * 0x9E3779B1)))


@triton.jit
def dropout_scale(row_lo, row_hi, col, seed_lo, seed_hi, keep_thr, inv_keep):
    """1 / (1 − p) where element (row, col) — counter row_lo/row_hi (``row_counter``) + col — is kept, else 0
    (fp32); broadcasts row_* against col. 32-bit arithmetic only (a carry instead of int64 counters keeps the register
    budget of the attention tiles). seed_lo / seed_hi: the seed's 32-bit halves; keep_thr = floor(p·2³²)."""
    lo = row_lo + col.to(tl.uint32)  # wraps mod 2³²
    hi = row_hi + (lo < row_lo).to(tl.uint32)  # carry into the high word
    return tl.where(keep_bits(lo, hi, seed_lo, seed_hi) >= keep_thr.to(tl.uint32), inv_keep, 0.0)


@triton.jit
def flat_dropout_scale(n, seed_lo, seed_hi, keep_thr, inv_keep):
    """``dropout_scale`` for int64 flat element counters n."""
    bits = keep_bits(n.to(tl.uint32), (n >> 32).to(tl.uint32), seed_lo, seed_hi)
    return tl.where(bits >= keep_thr.to(tl.uint32), inv_keep, 0.0)


#: Kernel parameters fed by ``dropout_args``: declared ``tl.int64`` and ``do_not_specialize`` in every kernel, so the
#: JIT compiles one variant whatever the drawn seed (unpinned, a seed half >= 2**31 turned the parameter into i64, a
#: 16-divisible one added a divisibility attribute and a half equal to 1 a constexpr: up to 4 variants per half,
#: a fresh compile for a new seed class, and variants tests/test_aot.py could not enumerate).
SEED_PARAMS = ("seed_lo", "seed_hi", "keep_thr")


def dropout_args(dropout) -> tuple[int, int, int, float]:
    """(seed_lo, seed_hi, keep_thr, inv_keep) kernel arguments for ``dropout`` = (p, seed) (or None: no dropout)."""
    if dropout is None:
        return 0, 0, 0, 1.0
    p, seed = float(dropout[0]), int(dropout[1])
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, dropout_keep_threshold(p), 1.0 / (1.0 - p)
