"""msa_fast.ops.attention on every backend available here vs the fp64 reference (outputs and q/k/v gradients).

"cpp" is skipped when the extension is not built (CI builds it: tests/test_ext.py); "triton" runs only when
msa_fast.kernels imports (CUDA, or the interpreter set up by conftest.py) and then on tiny shapes only.
"""
import sys

import pytest
import torch

from msa_fast import _ext
from msa_fast.ops import attention, use_backend
from msa_fast.testing import available_backends, compare_with_reference, random_padding_mask
from msa_fast.testing.reference import attention_ref, dropout_keep_mask

BACKENDS = available_backends()
CPU_BACKENDS = [b for b in ("torch", "cpp")]


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not available here (cpp: extension not built; triton: not importable)")


def _device(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


# (B, H, Lq, Lk, D): ragged lengths up to 600, head dims 12/16/32/64
SHAPES = [(2, 2, 7, 5, 12), (3, 2, 50, 376, 16), (2, 1, 33, 600, 32), (2, 2, 1, 129, 64), (1, 3, 65, 1, 16)]
TRITON_SHAPES = [(2, 2, 7, 5, 12), (1, 2, 20, 40, 32)]


def _case(B, H, Lq, Lk, D, device):
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, device=device) for L in (Lq, Lk, Lk))
    kpm = random_padding_mask(B, Lk).to(device)
    qpm = random_padding_mask(B, Lq, empty_row=False).to(device)
    return q, k, v, kpm, qpm


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("masks", ["key", "key+query", "none"])
def test_attention_matches_reference_fp32(backend, noncontig, masks):
    _need(backend)
    dev = _device(backend)
    for B, H, Lq, Lk, D in (TRITON_SHAPES if backend == "triton" else SHAPES):
        q, k, v, kpm, qpm = _case(B, H, Lq, Lk, D, dev)
        kpm = kpm if masks != "none" else None
        qpm = qpm if masks == "key+query" else None
        compare_with_reference(
            lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, backend=backend),
            lambda q, k, v: attention_ref(q, k, v, kpm, qpm),
            [q, k, v], torch.float32, name=f"{backend} {(B, H, Lq, Lk, D)} {masks}", noncontig=noncontig)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_attention_fp16(backend):
    _need(backend)
    dev = _device(backend)
    q, k, v, kpm, qpm = _case(2, 2, 9, 37, 16, dev)
    compare_with_reference(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm,
                                                     backend=backend),
                           lambda q, k, v: attention_ref(q, k, v, kpm, qpm), [q, k, v], torch.float16,
                           name=f"{backend} fp16")


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_fully_masked_rows_give_zeros_and_zero_grads(backend):
    _need(backend)
    q, k, v = (torch.randn(2, 2, L, 16, requires_grad=True) for L in (5, 9, 9))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1] = True  # sample 1 has no valid key
    out = attention(q, k, v, key_padding_mask=kpm, backend=backend)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.sum().backward()
    for t in (q, k, v):
        assert not torch.isnan(t.grad).any()
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1]))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_fp64(backend):
    _need(backend)
    B, H, Lq, Lk, D = 2, 2, 5, 70, 3  # Lk > 64: two key tiles in the C++ kernel
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, requires_grad=True) for L in (Lq, Lk, Lk))
    kpm = random_padding_mask(B, Lk)
    kpm[1, :3] = False
    qpm = torch.zeros(B, Lq, dtype=torch.bool)
    qpm[1, -1] = True
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm,
                                                              backend=backend), (q, k, v))


def test_cpp_writes_every_output_element():
    _need("cpp")
    lib = _ext.cpp_extension()
    if not hasattr(lib, "set_poison"):
        pytest.skip("extension built without the poison hook")
    lib.set_poison(True)
    try:
        for B, H, Lq, Lk, D in SHAPES[:3]:
            q, k, v, kpm, qpm = (t.float() if t.is_floating_point() else t for t in _case(B, H, Lq, Lk, D, "cpu"))
            out = attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, backend="cpp")
            assert not torch.isnan(out).any()
            torch.testing.assert_close(out, attention_ref(q, k, v, kpm, qpm), atol=1e-5, rtol=1e-4)
    finally:
        lib.set_poison(False)


def test_k_lengths_equals_mask():
    q, k, v = (torch.randn(3, 2, L, 8) for L in (4, 6, 6))
    lengths = torch.tensor([0, 3, 6])
    mask = torch.arange(6)[None] >= lengths[:, None]
    torch.testing.assert_close(attention(q, k, v, k_lengths=lengths), attention(q, k, v, key_padding_mask=mask))


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("lq, D", [(7, 16), (256, 64)])  # short queries: C++; >= SDPA_MIN_QUERY_ROWS: SDPA
def test_auto_route_matches_reference(masks, lq, D):
    """backend="auto" (C++ kernel or, where measured faster, torch SDPA) incl. fully masked rows and gradients."""
    q, k, v, kpm, qpm = _case(3, 2, lq, 70, D, "cpu")
    kpm, qpm = (kpm, qpm) if masks else (None, None)
    compare_with_reference(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm),
                           lambda q, k, v: attention_ref(q, k, v, kpm, qpm), [q, k, v], torch.float32,
                           name=f"auto Lq={lq} D={D}")


def test_dropout_without_kernel_dropout_uses_the_reference_and_backprops():
    q, k, v = (torch.randn(2, 2, L, 16, requires_grad=True) for L in (7, 11, 11))
    out = attention(q, k, v, dropout_p=0.5, backend="torch")
    out.sum().backward()
    assert q.grad is not None and not torch.isnan(q.grad).any()
    assert not torch.allclose(out, attention_ref(q, k, v))


SEED = 0x1234_5678_9ABC


@pytest.fixture
def fixed_seed(monkeypatch):
    """Pin the seed the op draws, so the kernel's mask is known: dropout_keep_mask(SEED, (B, H, Lq, Lk), p)."""
    monkeypatch.setattr(sys.modules["msa_fast.ops.attention"], "draw_seed", lambda: SEED)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("noncontig", [False, True])
def test_cpp_in_kernel_dropout_matches_reference_with_the_same_mask(fixed_seed, p, noncontig):
    """Forward and q/k/v gradients of the C++ kernel's dropout equal the reference applying the counter-RNG mask
    (ragged keys, a fully masked row, padded queries, head dims 12..64, a key axis crossing 64-key tiles)."""
    _need("cpp")
    for B, H, Lq, Lk, D in SHAPES:
        q, k, v, kpm, qpm = _case(B, H, Lq, Lk, D, "cpu")
        mask = dropout_keep_mask(SEED, (B, H, Lq, Lk), p)
        compare_with_reference(
            lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm, dropout_p=p,
                                      backend="cpp"),
            lambda q, k, v: attention_ref(q, k, v, kpm, qpm, dropout_p=p, dropout_mask=mask),
            [q, k, v], torch.float32, name=f"cpp dropout {p} {(B, H, Lq, Lk, D)}", noncontig=noncontig)


def test_cpp_dropout_keep_rate_and_seeding():
    """q = 0 and v = I expose the kernel's mask: keep rate ≈ 1 − p, a fresh mask per call, reproducible under
    torch.manual_seed, and different from the undropped output."""
    _need("cpp")
    p, L = 0.3, 128
    q, k, v = torch.zeros(2, 2, 40, L), torch.randn(2, 2, L, L), torch.eye(L).expand(2, 2, L, L).contiguous()

    def kept():
        return attention(q, k, v, dropout_p=p, backend="cpp") * L * (1 - p) > 0.5

    torch.manual_seed(7)
    a, b = kept(), kept()
    torch.manual_seed(7)
    assert torch.equal(kept(), a)
    assert not torch.equal(a, b)
    rate = a.float().mean().item()
    assert abs(rate - (1 - p)) < 0.02, rate  # 20 480 Bernoulli draws: 5 sigma ≈ 0.016
    assert 0.35 < (a == b).float().mean().item() < 0.75  # independent masks agree on p² + (1 − p)² = 0.58


def test_cpp_dropout_fully_masked_rows_give_zeros_and_finite_grads():
    _need("cpp")
    q, k, v = (torch.randn(2, 2, L, 16, requires_grad=True) for L in (5, 9, 9))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0] = True
    out = attention(q, k, v, key_padding_mask=kpm, dropout_p=0.5, backend="cpp")
    out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_use_backend_and_env_override(monkeypatch):
    q, k, v = (torch.randn(1, 1, L, 4) for L in (3, 5, 5))
    kpm = torch.tensor([[False, False, True, False, True]])
    ref = attention_ref(q, k, v, kpm)
    with use_backend("torch"):
        torch.testing.assert_close(attention(q, k, v, key_padding_mask=kpm), ref)
    monkeypatch.setenv("MSA_FAST_BACKEND", "torch")
    torch.testing.assert_close(attention(q, k, v, key_padding_mask=kpm), ref)
    monkeypatch.setenv("MSA_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MSA_FAST_BACKEND"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("nope"):
            pass


def test_cpp_without_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(_ext, "cpp_available", lambda: False)
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="msa_fast._C"):
        attention(q, q, q, backend="cpp")
    torch.testing.assert_close(attention(q, q, q, key_padding_mask=torch.zeros(1, 2, dtype=torch.bool)),
                               attention_ref(q, q, q))  # auto falls back to torch


@pytest.mark.parametrize("bad, exc, match", [
    (dict(k=torch.randn(3, 2, 5, 8)), ValueError, "k must be"),
    (dict(k=torch.randn(2, 2, 5, 4)), ValueError, "k must be"),
    (dict(v=torch.randn(2, 2, 6, 8)), ValueError, "v must have"),
    (dict(q=torch.randn(2, 2, 4, 8, dtype=torch.float64)), TypeError, "k has dtype"),
    (dict(q=torch.randint(0, 3, (2, 2, 4, 8))), TypeError, "q must be a floating"),
    (dict(q=torch.randn(2, 4, 8)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(2, 2, 5, 8, device="meta")), ValueError, "k is on meta"),
    (dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.zeros(2, 5)), TypeError, "key_padding_mask must be a bool"),
    (dict(query_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "query_padding_mask"),
    (dict(k_lengths=torch.tensor([1, 7])), ValueError, "k_lengths must lie"),
    (dict(k_lengths=torch.tensor([1, 2]), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError,
     "not both"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_arguments_are_named(bad, exc, match):
    args = dict(q=torch.randn(2, 2, 4, 8), k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8))
    args.update(bad)
    with pytest.raises(exc, match=match):
        attention(**args)


def test_forced_triton_on_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        attention(q, q, q, backend="triton")


@pytest.mark.parametrize("D", [12, 16, 32])
def test_auto_inference_route_matches_reference(D):
    """Under no_grad "auto" may use torch SDPA (D < 12, see msa_fast.ops.attention): same results, no NaN for fully
    masked rows, zero rows for padded queries."""
    q, k, v, kpm, qpm = (t.float() if t.is_floating_point() else t for t in _case(3, 2, 7, 70, D, "cpu"))
    with torch.no_grad():
        out = attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
    ref64 = attention_ref(q.double(), k.double(), v.double(), kpm, qpm)
    from msa_fast.testing import assert_close_to_reference
    assert_close_to_reference(out, ref64, attention_ref(q, k, v, kpm, qpm), name=f"auto no_grad D={D}")
