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
    with pytest.raises(ValueError, match="valid must have shape"):
        masked_mean(x, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"valid must be a bool tensor \(bool, True = valid position\)"):
        masked_mean(x, torch.ones(3, 5))
    with pytest.raises(ValueError, match="x must be 3-D"):
        masked_mean(x[0])


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_masked_mean_names_its_mask_convention(backend):
    """valid= (True = valid; also positional) and key_padding_mask= (True = padding, as the attention ops) give the
    same result for complementary masks; a fully padded row (a missing modality) gives zeros under both."""
    _need(backend)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x = torch.randn(3, 6, 4, device=dev)
    valid = torch.rand(3, 6, device=dev) < 0.5
    valid[0] = False
    ref = masked_mean_ref(x, valid)
    for out in (masked_mean(x, valid, backend=backend), masked_mean(x, valid=valid, backend=backend),
                masked_mean(x, key_padding_mask=~valid, backend=backend)):
        torch.testing.assert_close(out, ref)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
    all_padding = torch.ones(3, 6, dtype=torch.bool, device=dev)
    assert torch.equal(masked_mean(x, key_padding_mask=all_padding, backend=backend), torch.zeros(3, 4, device=dev))
    torch.testing.assert_close(masked_mean(x, backend=backend), x.mean(1))


def test_masked_mean_refuses_ambiguous_masks():
    x = torch.randn(2, 5, 3)
    m = torch.rand(2, 5) < 0.5
    with pytest.raises(TypeError,
                       match=r"no longer takes mask=.*valid=.*True = valid.*key_padding_mask=.*True = padding"):
        masked_mean(x, mask=m)
    with pytest.raises(TypeError, match="not both"):
        masked_mean(x, m, key_padding_mask=~m)
    with pytest.raises(TypeError, match="unexpected keyword"):
        masked_mean(x, valdi=m)
    # 0/1 masks carry no convention: refused, naming what the keyword means and how to pass either convention
    for kw, meaning in (("valid", "True = valid position"), ("key_padding_mask", "True = padding")):
        for bad in (m.long(), m.float(), m.to(torch.uint8)):
            with pytest.raises(TypeError, match=rf"{kw} must be a bool tensor \(bool, {meaning}\).*valid=.*"
                                                r"key_padding_mask="):
                masked_mean(x, **{kw: bad})
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        masked_mean(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
