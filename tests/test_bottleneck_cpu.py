"""The C++ bottleneck-exchange kernel (csrc/bottleneck_cpu.cpp) vs the fp64 reference: its float32 fast path
(K <= 16, D in 16 / 32 / 64, R-row groups and tails), its generic path (other D, K > 16, float64), ragged and fully
masked rows, non-contiguous inputs, outputs and gradients (error rule of msa_fast.testing: at most 2 x the
same-dtype torch error + atol), every output element written (poisoned outputs), the concatenated contract entry
points, and the auto route on CPU."""
import pytest
import torch

from msa_fast import _ext
from msa_fast.ops import bottleneck_exchange
from msa_fast.testing import compare_with_reference, random_padding_mask
from msa_fast.testing.reference import bottleneck_exchange_ref

lib = _ext.cpp_extension()
pytestmark = pytest.mark.skipif(lib is None or not hasattr(lib, "bottleneck_forward_list"),
                                reason="msa_fast._C (with bottleneck_forward_list) not built")


@pytest.fixture
def poisoned():
    lib.set_poison(True)
    try:
        yield
    finally:
        lib.set_poison(False)


def _inputs(B, H, lens, K, D, seed, masks):
    g = torch.Generator().manual_seed(seed)
    qs = [torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in lens]
    ks = [torch.randn(B, H, K, D, dtype=torch.float64, generator=g) for _ in lens]
    vs = [torch.randn(B, H, K, D, dtype=torch.float64, generator=g) for _ in lens]
    qpms = kpm = None
    if masks:
        qpms = [random_padding_mask(B, L, g, empty_row=(m == 0)) if m != 1 else None for m, L in enumerate(lens)]
        kpm = random_padding_mask(B, K, g, empty_row=False)
        kpm[-1] = True  # the last sample has no valid bottleneck token: its rows give zeros
    return qs, ks, vs, qpms, kpm


# (B, H, modality lengths, K, D): fast path at MSA sizes (K = 8 / 4 / 2 / 16, D = 16 / 32 / 64; lengths that are
# not multiples of the 4-row groups nor of the 128-row blocks), then the generic path (D = 12, K = 17)
CASES = [(2, 2, (50, 377, 130), 8, 16), (2, 2, (7, 129, 3), 4, 32), (1, 3, (1, 66, 2), 2, 64),
         (2, 1, (31, 0, 257), 16, 16), (2, 2, (9, 70, 5), 5, 12), (1, 2, (4, 65, 3), 17, 16)]


@pytest.mark.parametrize("B, H, lens, K, D", CASES)
@pytest.mark.parametrize("masks", [True, False])
@pytest.mark.parametrize("noncontig", [False, True])
def test_kernel_matches_fp64_reference(B, H, lens, K, D, masks, noncontig, poisoned):
    qs, ks, vs, qpms, kpm = _inputs(B, H, lens, K, D, seed=hash((B, H, lens, K, D, masks)) % 2**31, masks=masks)
    M = len(lens)
    compare_with_reference(
        lambda *t: bottleneck_exchange(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm, backend="cpp"),
        lambda *t: bottleneck_exchange_ref(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm),
        [*qs, *ks, *vs], torch.float32, name=f"cpp {lens} K={K} D={D}", noncontig=noncontig)


def test_fully_masked_rows_are_zero_with_zero_gradients(poisoned):
    B, H, lens, K, D = 3, 2, (6, 9, 13), 8, 16
    qs, ks, vs, _, _ = _inputs(B, H, lens, K, D, seed=3, masks=False)
    qs = [q.float().requires_grad_() for q in qs]
    ks = [k.float().requires_grad_() for k in ks]
    vs = [v.float().requires_grad_() for v in vs]
    qpms = [torch.zeros(B, L, dtype=torch.bool) for L in lens]
    for m in qpms:
        m[1] = True  # sample 1: every query row padded
    kpm = torch.zeros(B, K, dtype=torch.bool)
    kpm[2] = True  # sample 2: every key padded
    with torch.no_grad():  # NaN in what must not matter: padded query rows, padded keys
        for q in qs:
            q[1] = float("nan")
        for k, v in zip(ks, vs):
            k[2] = float("nan")
            v[2] = float("inf")
    outs = bottleneck_exchange(qs, ks, vs, qpms, kpm, backend="cpp")
    for o in outs:
        assert torch.equal(o[1:], torch.zeros_like(o[1:]))
        assert torch.isfinite(o[0]).all()
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    for q, k, v in zip(qs, ks, vs):
        assert torch.equal(q.grad[1:], torch.zeros_like(q.grad[1:]))
        assert torch.equal(k.grad[1:], torch.zeros_like(k.grad[1:]))
        assert torch.equal(v.grad[1:], torch.zeros_like(v.grad[1:]))
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("K, D", [(8, 16), (3, 32), (16, 12)])
def test_fp64_gradcheck(K, D):
    qs, ks, vs, qpms, kpm = _inputs(2, 1, (5, 9, 2), K, D, seed=K, masks=True)
    leaves = [t.requires_grad_(True) for t in (*qs, *ks, *vs)]
    assert torch.autograd.gradcheck(
        lambda *t: bottleneck_exchange(t[:3], t[3:6], t[6:], qpms, kpm, scale=0.3, backend="cpp"), leaves)


@pytest.mark.parametrize("K, D", [(8, 16), (4, 32), (6, 12)])
def test_concatenated_contract_entry_points(K, D, poisoned):
    """bottleneck_forward / bottleneck_backward (q concatenated over the modalities, k / v stacked, delta given)
    agree with the list entry points the op uses."""
    from msa_fast.ops import _cpp_backend as cb

    B, H, lens = 2, 2, (5, 70, 9)
    qs, ks, vs, qpms, kpm = _inputs(B, H, lens, K, D, seed=7, masks=True)
    qs, ks, vs = [[t.float() for t in ts] for ts in (qs, ks, vs)]
    q_valids = [None if m is None else ~m for m in qpms]
    outs, lses = cb.bottleneck_forward_list(qs, ks, vs, ~kpm, q_valids, 0.25)
    offs = [0, 5, 75, 84]
    qv = torch.cat([torch.ones(B, L, dtype=torch.bool) if m is None else m for m, L in zip(q_valids, lens)], 1)
    out, lse = cb.bottleneck_forward(torch.cat(qs, 2), offs, torch.stack(ks, 2), torch.stack(vs, 2), ~kpm, qv, 0.25)
    torch.testing.assert_close(out, torch.cat(outs, 2), rtol=0, atol=0)
    torch.testing.assert_close(lse, torch.cat(lses, 2), rtol=0, atol=0)
    gs = [torch.randn_like(o) for o in outs]
    dqs, dks, dvs = cb.bottleneck_backward_list(qs, ks, vs, ~kpm, 0.25, lses, gs)
    g = torch.cat(gs, 2)
    delta = (g * out).sum(-1)
    dq, dk, dv = cb.bottleneck_backward(torch.cat(qs, 2), offs, torch.stack(ks, 2), torch.stack(vs, 2), ~kpm, None,
                                        0.25, lse, delta, g)
    torch.testing.assert_close(dq, torch.cat(dqs, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk, torch.stack(dks, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv, torch.stack(dvs, 2), rtol=1e-5, atol=1e-5)


def test_auto_on_cpu_runs_the_kernel():
    """backend="auto" on CPU runs the C++ kernel (measured faster than the eager composition at every MSA shape,
    msa_fast.ops.bottleneck_exchange docstring): bit-identical to backend="cpp"."""
    qs = [torch.randn(2, 2, n, 16, requires_grad=True) for n in (5, 9, 3)]
    ks = [torch.randn(2, 2, 8, 16) for _ in qs]
    vs = [torch.randn(2, 2, 8, 16) for _ in qs]
    auto = bottleneck_exchange(qs, ks, vs)
    forced = bottleneck_exchange(qs, ks, vs, backend="cpp")
    assert all(torch.equal(a, f) for a, f in zip(auto, forced))
    ref = bottleneck_exchange_ref(qs, ks, vs)
    assert all(torch.allclose(a, r, atol=1e-5) for a, r in zip(auto, ref))
