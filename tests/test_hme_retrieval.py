"""HME in-batch retrieval op: official parity fixture, plain-loop reference (fp64), gradients, both backends."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must precede any import of the kernel module (tests/conftest.py does the same)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from msa_fast.retrieval import in_batch_retrieve, official_loop_retrieve  # noqa: E402
from parity_fixtures import parity_path

FIXTURE = str(parity_path("hme_mosi.pt"))
BACKENDS = ["torch", "triton"]


def _loop_with_availability(h: torch.Tensor, avail: torch.Tensor, threshold: float) -> torch.Tensor:
    """Official loop with missing rows removed from the candidates (neighbours and fallback)."""
    cos = F.cosine_similarity(h[:, None], h[None], dim=-1).fill_diagonal_(float("-inf"))
    cand = (h.sum(1) != 0) & avail
    rows = []
    for i in range(h.shape[0]):
        idx = ((cos[i] >= threshold) & avail).nonzero().flatten()
        if h[i].sum() == 0 or idx.numel() == 0:
            rows.append(h[cand].mean(0) if bool(cand.any()) else torch.zeros_like(h[0]))
        else:
            rows.append(h[idx].mean(0))
    return torch.stack(rows)


def _clustered(b: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, d, generator=g, dtype=dtype)
    h = centers[torch.randint(0, 4, (b,), generator=g)] + 0.6 * torch.randn(b, d, generator=g, dtype=dtype)
    h[torch.randperm(b, generator=g)[:2]] = 0.0  # zero rows: fallback, cosine 0 with everything
    h[-1] = -centers[0]  # a lonely row (no neighbour reaches the threshold, usually)
    return h


def _cases():
    data = torch.load(FIXTURE, weights_only=True)
    yield "full", data["outputs"], data["retrieval_fallback_rows"], data["retrieval_threshold"]
    for name, case in data["extra_cases"].items():
        yield name, case["outputs"], case["retrieval_fallback_rows"], case["retrieval_threshold"]


@pytest.mark.skipif(not os.path.exists(FIXTURE), reason="parity fixture not available")
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_official_fixture(backend):
    for name, out, fallback_rows, alpha in _cases():
        for m in "lav":
            h = out[f"H_{m}"]
            r, info = in_batch_retrieve(h, threshold=alpha, backend=backend, return_similarity=backend == "torch")
            torch.testing.assert_close(r, out[f"R_{m}"], rtol=1e-5, atol=1e-5, msg=f"{name}/{m}")
            assert info["fallback"].nonzero().flatten().tolist() == fallback_rows[m], (name, m)
            if backend == "torch":
                cos = out[f"retrieval.cos_{m}"]
                finite = torch.isfinite(cos)
                assert torch.equal(finite, torch.isfinite(info["cos"]))
                torch.testing.assert_close(info["cos"][finite], cos[finite], rtol=0, atol=1e-6)
                assert torch.equal(info["neighbours"], out[f"retrieval.neighbours_{m}"]), (name, m)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,d,alpha,seed", [(37, 24, 0.6, 0), (64, 48, 0.3, 1), (5, 16, 0.9, 2), (1, 8, 0.6, 3)])
def test_forward_and_grad_match_loop(backend, b, d, alpha, seed):
    h64 = _clustered(b, d, seed).requires_grad_(True)
    g = torch.randn(b, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    ref = official_loop_retrieve(h64, alpha)
    (ref * g).sum().backward()
    ref_grad = h64.grad.clone()

    # fp32 input, non-contiguous (a column slice of a wider buffer)
    wide = torch.zeros(b, d + 5)
    wide[:, 2:2 + d] = h64.detach().float()
    h = wide[:, 2:2 + d]
    h.requires_grad_(True)
    assert b == 1 or not h.is_contiguous()
    r, info = in_batch_retrieve(h, threshold=alpha, backend=backend)
    (r * g.float()).sum().backward()
    torch.testing.assert_close(r.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.double(), ref_grad, rtol=1e-5, atol=1e-5)
    assert info["fallback"].dtype == torch.bool and info["count"].shape == (b,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_torch_exact_and_availability(backend):
    b, d, alpha = 40, 32, 0.4
    h = _clustered(b, d, 7).requires_grad_(True)
    avail = torch.rand(b, generator=torch.Generator().manual_seed(3)) > 0.3
    ref = _loop_with_availability(h, avail, alpha)
    g = torch.randn(b, d, dtype=torch.float64)
    ref_grad, = torch.autograd.grad((ref * g).sum(), h)
    r, info = in_batch_retrieve(h, avail, threshold=alpha, backend=backend)
    grad, = torch.autograd.grad((r * g).sum(), h)
    tol = 1e-12 if backend == "torch" else 1e-5
    torch.testing.assert_close(r, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
    # a missing row is never anyone's neighbour
    _, info_t = in_batch_retrieve(h.detach(), avail, threshold=alpha, backend="torch", return_similarity=True)
    assert not info_t["neighbours"][:, ~avail].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_missing_gives_zeros_not_nan(backend):
    h = torch.zeros(6, 16, requires_grad=True)
    r, info = in_batch_retrieve(h, backend=backend)
    assert torch.equal(r, torch.zeros(6, 16)) and info["fallback"].all()
    r.sum().backward()
    assert torch.isfinite(h.grad).all()
    h2 = torch.randn(6, 16)
    r2, _ = in_batch_retrieve(h2, torch.zeros(6, dtype=torch.bool), backend=backend)
    assert torch.equal(r2, torch.zeros(6, 16))


def test_missing_rows_retrieve_each_other_without_availability():
    """Official behaviour: identical constant vectors (a zeroed modality after the encoder) are each other's
    neighbours (cosine 1) when no availability mask is given."""
    h = torch.randn(8, 16)
    h[[1, 4, 6]] = torch.full((16,), 0.3)
    r, info = in_batch_retrieve(h, backend="torch")
    torch.testing.assert_close(r[[1, 4, 6]], torch.full((3, 16), 0.3))
    assert info["count"][[1, 4, 6]].tolist() == [2, 2, 2]


def test_bad_input():
    with pytest.raises(ValueError, match="h must be a"):
        in_batch_retrieve(torch.randn(4, 3, 2))
    with pytest.raises(TypeError, match="floating"):
        in_batch_retrieve(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="available"):
        in_batch_retrieve(torch.randn(4, 3), torch.ones(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        in_batch_retrieve(torch.randn(4, 3), torch.ones(4))
    with pytest.raises(ValueError, match="backend"):
        in_batch_retrieve(torch.randn(4, 3), backend="cuda")
    with pytest.raises(ValueError, match="threshold"):
        in_batch_retrieve(torch.randn(4, 3), threshold=2.0)
    with pytest.raises(ValueError, match="return_similarity"):
        in_batch_retrieve(torch.randn(4, 3), backend="triton", return_similarity=True)
