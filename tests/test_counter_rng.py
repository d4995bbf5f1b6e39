"""The counter-based dropout RNG's torch definition (msa_fast.testing.reference) against plain Python integers.

The C++ (csrc/counter_rng.h) and Triton kernels are checked against this torch definition in their op tests."""
import torch

from msa_fast.testing.reference import counter_rng_bits, dropout_keep_mask, dropout_keep_threshold

M32 = 0xFFFFFFFF


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def _bits(seed: int, n: int) -> int:
    return _fmix32(_fmix32((n & M32) ^ (seed & M32)) ^ (seed >> 32) ^ (((n >> 32) * 0x9E3779B1) & M32))


def test_counter_rng_bits_equal_plain_integer_arithmetic():
    g = torch.Generator().manual_seed(0)
    counters = torch.cat([torch.arange(100), torch.randint(0, 2**62, (200,), generator=g),
                          torch.arange(2**32 - 50, 2**32 + 50)])  # incl. a crossing of the high word
    for seed in (0, 1, 2**63 - 1, 0x1234_5678_9ABC_DEF0):
        got = counter_rng_bits(seed, counters).tolist()
        assert got == [_bits(seed, int(n)) for n in counters]


def test_keep_mask_rate_threshold_and_edges():
    assert dropout_keep_threshold(0.0) == 0 and dropout_keep_threshold(0.5) == 2**31
    assert dropout_keep_mask(3, (4, 5), 0.0).all()
    assert not dropout_keep_mask(3, (4, 5), 1.0).any()
    m = dropout_keep_mask(12345, (200, 500), 0.25)
    assert abs(m.float().mean().item() - 0.75) < 0.005  # 10⁵ draws: σ ≈ 0.0014 (fixed seed: deterministic)
    other = dropout_keep_mask(12346, (200, 500), 0.25)
    assert abs((m == other).float().mean().item() - (0.75**2 + 0.25**2)) < 0.01  # neighbouring seeds independent
