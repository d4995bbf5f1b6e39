"""Property-based fuzzing (hypothesis) of shapes, lengths and masks for the C++ and torch backends vs the fp64
reference (outputs and gradients, error rule of msa_fast.testing)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_fast.ops import attention, bottleneck_exchange, masked_mean, multi_source_attention
from msa_fast.testing import available_backends, compare_with_reference
from msa_fast.testing.reference import (attention_ref, bottleneck_exchange_ref, masked_mean_ref,
                                        multi_source_attention_ref)

BACKENDS = [b for b in available_backends(include_triton=False)]
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _mask(draw, B, L):
    """Random bool mask (True = padding), any pattern (not only suffixes)."""
    bits = draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))
    return torch.tensor(bits, dtype=torch.bool).view(B, L)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_attention(backend, data):
    d = data.draw
    B, H = d(st.integers(1, 3)), d(st.integers(1, 3))
    Lq, Lk, D = d(st.integers(1, 40)), d(st.integers(0, 150)), d(st.sampled_from([1, 3, 12, 16, 32, 64]))
    kpm = _mask(d, B, Lk) if d(st.booleans()) else None
    qpm = _mask(d, B, Lq) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in (Lq, Lk, Lk))
    compare_with_reference(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm,
                                                     backend=backend),
                           lambda q, k, v: attention_ref(q, k, v, kpm, qpm), [q, k, v], torch.float32,
                           name=f"{backend} B{B} H{H} Lq{Lq} Lk{Lk} D{D}", noncontig=d(st.booleans()))


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_multi_source(backend, data):
    d = data.draw
    B, H, Lq, D = d(st.integers(1, 2)), d(st.integers(1, 2)), d(st.integers(1, 20)), d(st.sampled_from([4, 12, 16]))
    lens = d(st.lists(st.integers(0, 80), min_size=1, max_size=4))
    masks = [(_mask(d, B, L) if d(st.booleans()) else None) for L in lens]
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    q = torch.randn(B, H, Lq, D, dtype=torch.float64, generator=g)
    kv = [torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in lens for _ in range(2)]
    src = lambda kv: [(kv[2 * i], kv[2 * i + 1], m) for i, m in enumerate(masks)]  # noqa: E731
    compare_with_reference(lambda q, *kv: multi_source_attention(q, src(kv), backend=backend),
                           lambda q, *kv: multi_source_attention_ref(q, src(kv)), [q, *kv], torch.float32,
                           name=f"{backend} lens={lens} D{D}")


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_bottleneck(backend, data):
    d = data.draw
    B, H, K, D = d(st.integers(1, 3)), d(st.integers(1, 2)), d(st.integers(1, 16)), d(st.sampled_from([4, 12, 32]))
    lens = d(st.lists(st.integers(0, 70), min_size=1, max_size=3))
    M = len(lens)
    qpms = [(_mask(d, B, L) if d(st.booleans()) else None) for L in lens]
    kpm = _mask(d, B, K) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    qs = [torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in lens]
    kvs = [torch.randn(B, H, K, D, dtype=torch.float64, generator=g) for _ in range(2 * M)]
    compare_with_reference(lambda *t: bottleneck_exchange(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm, backend=backend),
                           lambda *t: bottleneck_exchange_ref(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm),
                           [*qs, *kvs], torch.float32, name=f"{backend} lens={lens} K{K} D{D}")


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_masked_mean(backend, data):
    d = data.draw
    B, L, D = d(st.integers(1, 4)), d(st.integers(1, 50)), d(st.integers(1, 40))
    valid = ~_mask(d, B, L)
    x = torch.randn(B, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(d(st.integers(0, 99))))
    compare_with_reference(lambda x: masked_mean(x, valid, backend=backend), lambda x: masked_mean_ref(x, valid),
                           [x], torch.float32, name=f"{backend} {(B, L, D)}")
