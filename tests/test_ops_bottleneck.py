"""msa_fast.ops.bottleneck_exchange: every modality token attends to its sample's K bottleneck tokens (all
modalities in one launch) vs the fp64 reference on every backend."""
import pytest
import torch

from msa_fast.ops import bottleneck_exchange
from msa_fast.testing import available_backends, compare_with_reference, random_padding_mask
from msa_fast.testing.reference import bottleneck_exchange_ref

BACKENDS = available_backends()


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not available here (cpp: extension not built; triton: not importable)")


# (B, H, modality lengths, K, D)
CASES = [(2, 2, (5, 0, 9), 1, 12), (3, 2, (50, 376, 501), 8, 16), (2, 1, (33, 70, 2), 16, 32), (1, 2, (4, 4, 4), 4, 64)]
TRITON_CASES = [(2, 2, (5, 0, 9), 3, 12), (1, 2, (20, 9, 3), 8, 32)]


def _build(B, H, lens, K, D, device="cpu"):
    qs = [torch.randn(B, H, L, D, dtype=torch.float64, device=device) for L in lens]
    ks = [torch.randn(B, H, K, D, dtype=torch.float64, device=device) for _ in lens]
    vs = [torch.randn(B, H, K, D, dtype=torch.float64, device=device) for _ in lens]
    qpms = [random_padding_mask(B, L, empty_row=(m == 0)).to(device) if m != 1 else None for m, L in enumerate(lens)]
    kpm = random_padding_mask(B, K, empty_row=(B > 2)).to(device)  # sample 0 has no valid bottleneck when B > 2
    return qs, ks, vs, qpms, kpm


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("with_masks", [True, False])
def test_bottleneck_matches_reference(backend, noncontig, with_masks):
    _need(backend)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    for B, H, lens, K, D in (TRITON_CASES if backend == "triton" else CASES):
        qs, ks, vs, qpms, kpm = _build(B, H, lens, K, D, dev)
        if not with_masks:
            qpms, kpm = None, None
        M = len(lens)
        compare_with_reference(
            lambda *t: bottleneck_exchange(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm, backend=backend),
            lambda *t: bottleneck_exchange_ref(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm),
            [*qs, *ks, *vs], torch.float32, name=f"{backend} {lens} K={K} D={D}", noncontig=noncontig)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_bottleneck_gradcheck_fp64(backend):
    _need(backend)
    qs, ks, vs, qpms, kpm = _build(3, 1, (2, 33, 1), 3, 2)
    leaves = [t.requires_grad_(True) for t in (*qs, *ks, *vs)]
    assert torch.autograd.gradcheck(
        lambda *t: bottleneck_exchange(t[:3], t[3:6], t[6:], qpms, kpm, scale=0.7, backend=backend), leaves)


@pytest.mark.parametrize("bad, exc, match", [
    ("count", ValueError, "one entry per modality"),
    ("kshape", ValueError, r"keys\[1\] must be"),
    ("vshape", ValueError, r"values\[0\] must have"),
    ("qmask", ValueError, r"query_padding_masks\[2\] must have shape"),
    ("kmask", ValueError, "key_padding_mask must have shape"),
    ("dtype", TypeError, r"queries\[1\] has dtype"),
    ("notlist", ValueError, "queries must be a non-empty list"),
])
def test_bad_arguments_are_named(bad, exc, match):
    B, H, K, D = 2, 2, 4, 8
    qs = [torch.randn(B, H, L, D) for L in (3, 5, 2)]
    ks = [torch.randn(B, H, K, D) for _ in range(3)]
    vs = [torch.randn(B, H, K, D) for _ in range(3)]
    qpms, kpm = None, None
    if bad == "count":
        ks = ks[:2]
    elif bad == "kshape":
        ks[1] = torch.randn(B, H, K + 1, D)
    elif bad == "vshape":
        vs[0] = torch.randn(B, H, K, D + 1)
    elif bad == "qmask":
        qpms = [None, None, torch.zeros(B, 3, dtype=torch.bool)]
    elif bad == "kmask":
        kpm = torch.zeros(B, K + 1, dtype=torch.bool)
    elif bad == "dtype":
        qs[1] = qs[1].double()
    elif bad == "notlist":
        qs = qs[0]
    with pytest.raises(exc, match=match):
        bottleneck_exchange(qs, ks, vs, qpms, kpm)
