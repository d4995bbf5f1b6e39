"""Triton masked mean (msa_fast.kernels.masked_mean) vs the fp64 reference (CUDA, or CPU under the interpreter)."""
import pytest
import torch

from msa_fast.testing.reference import masked_mean_ref

mm = pytest.importorskip("msa_fast.kernels.masked_mean")

pytestmark = pytest.mark.interpret

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("B,L,D,noncontig,mask_mode", [
    (2, 70, 12, False, "ragged"),      # L spans two 64-row chunks; one empty row
    (2, 5, 130, True, "ragged"),       # D spans three 64-wide chunks; (B, D, L) storage viewed as (B, L, D)
    (1, 33, 64, False, "none"),        # mask=None: plain mean
])
def test_forward_backward_match_fp64_reference(dtype, B, L, D, noncontig, mask_mode, triton_device, poison_empty,
                                               error_rule):
    if dtype == BF16 and triton_device == "cpu":
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")
    x = (torch.randn(B, D, L, dtype=torch.float64).transpose(1, 2) if noncontig
         else torch.randn(B, L, D, dtype=torch.float64)).to(device=triton_device, dtype=dtype)
    valid = None
    if mask_mode == "ragged":
        lengths = torch.randint(1, L + 1, (B,))
        lengths[-1] = 0  # an empty row (fully missing modality) gives zeros, not NaN
        valid = (torch.arange(L)[None] < lengths[:, None]).to(triton_device)

    out = mm.forward(x, valid)
    x64 = x.detach().double().requires_grad_()
    xs = x.detach().clone().requires_grad_()
    ref64 = masked_mean_ref(x64, valid, upcast=True)
    ref_dt = masked_mean_ref(xs, valid)
    assert out.dtype == dtype and out.shape == (B, D)
    error_rule("out", out, ref64, ref_dt)
    if mask_mode == "ragged":
        assert (out[-1] == 0).all()

    dout = torch.randn(B, D, dtype=torch.float64).to(device=triton_device, dtype=dtype)
    dx = mm.backward(x, valid, dout)
    (g64,) = torch.autograd.grad(ref64, x64, dout.double())
    (gdt,) = torch.autograd.grad(ref_dt, xs, dout)
    assert dx.dtype == dtype and dx.shape == x.shape
    error_rule("dx", dx, g64, gdt)


def test_invalid_arguments_raise(triton_device):
    x = torch.randn(2, 4, 8, device=triton_device)
    with pytest.raises(ValueError, match="valid"):
        mm.forward(x, torch.ones(2, 5, dtype=torch.bool, device=triton_device))
    with pytest.raises(TypeError, match="bool"):
        mm.forward(x, torch.ones(2, 4, device=triton_device))
    with pytest.raises(ValueError, match="dout"):
        mm.backward(x, None, torch.randn(2, 7, device=triton_device))
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        mm.forward(x[0], None)
