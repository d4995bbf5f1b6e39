"""msa_fast.ops.masked_mean vs the fp64 reference on every backend."""
import pytest
import torch

from msa_fast.ops import masked_mean
from msa_fast.testing import available_backends, compare_with_reference
from msa_fast.testing.reference import masked_mean_ref

BACKENDS = available_backends()


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not available here (cpp: extension not built; triton: not importable)")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("shape", [(4, 7, 5), (3, 376, 32), (2, 1, 12)])
def test_masked_mean_matches_reference(backend, shape):
    _need(backend)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    B, L, D = shape
    x = torch.randn(B, L, D, dtype=torch.float64, device=dev)
    mask = (torch.rand(B, L) < 0.6).to(dev)
    mask[0] = False  # an empty row → zeros
    for m in (mask, None):
        compare_with_reference(lambda x: masked_mean(x, m, backend=backend), lambda x: masked_mean_ref(x, m),
                               [x], torch.float32, name=f"{backend} {shape}")
        out = masked_mean(x.float(), m, backend=backend)
        assert not torch.isnan(out).any()
    assert torch.equal(masked_mean(x.float(), mask, backend=backend)[0], torch.zeros(D, device=dev))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_masked_mean_gradcheck(backend):
    _need(backend)
    x = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 6) < 0.5
    mask[1] = False
    assert torch.autograd.gradcheck(lambda x: masked_mean(x, mask, backend=backend), (x,))


def test_masked_mean_non_contiguous_and_errors():
    x = torch.randn(5, 3, 4).transpose(0, 1)  # (3, 5, 4) non-contiguous
    mask = torch.rand(3, 5) < 0.5
    torch.testing.assert_close(masked_mean(x, mask), masked_mean_ref(x, mask))
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_mean(x, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool"):
        masked_mean(x, torch.ones(3, 5))
    with pytest.raises(ValueError, match="x must be 3-D"):
        masked_mean(x[0])
