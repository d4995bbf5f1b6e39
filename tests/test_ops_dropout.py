"""msa_fast.ops.dropout / msa_fast.nn.Dropout: every fused backend draws exactly the reference counter-RNG mask.

"cpp" is skipped when the extension is not built (CI builds it); "triton" runs under the interpreter on CPU tensors
(conftest.py) — fp32 / fp16 (the interpreter has no bf16 arithmetic).
"""
import pytest
import torch

from msa_fast import _ext
from msa_fast.nn import Dropout
from msa_fast.ops import dropout
from msa_fast.testing import available_backends
from msa_fast.testing.reference import dropout_keep_mask

BACKENDS = available_backends()
FUSED = [("cpp", torch.float32), ("cpp", torch.float64), ("triton", torch.float32), ("triton", torch.float16)]
SEED = 0x5EED_0123_4567


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not available here")


def _reference(x, p, seed):
    """fp64 x · keep / (1 − p) with the counter-RNG mask of the contiguous layout."""
    return x.double() * dropout_keep_mask(seed, x.shape, p).to(x.device) / (1.0 - p)


@pytest.mark.parametrize("backend, dtype", FUSED)
@pytest.mark.parametrize("shape", [(7,), (3, 1025), (2, 33, 65), (4, 5, 6, 7)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fused_dropout_equals_the_reference_mask_forward_and_backward(backend, dtype, shape, p):
    _need(backend)
    x = torch.randn(shape, dtype=torch.float64).to(dtype).requires_grad_()
    y = dropout(x, p, seed=SEED, backend=backend)
    ref = _reference(x.detach(), p, SEED)
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float16 else dict(rtol=1e-6, atol=1e-7)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), ref, **tol)
    assert torch.equal(y == 0, (ref == 0) | (x.detach() == 0))  # the dropped set is exactly the reference's
    g = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx.double(), _reference(g, p, SEED), **tol)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_non_contiguous_input_uses_the_contiguous_flat_index(backend):
    _need(backend)
    base = torch.randn(6, 40)
    x = base.t()  # (40, 6), non-contiguous
    y = dropout(x, 0.3, seed=SEED, backend=backend)
    torch.testing.assert_close(y.double(), _reference(x.contiguous(), 0.3, SEED), rtol=1e-6, atol=1e-7)


def test_cpp_gradcheck_fp64():
    _need("cpp")
    x = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dropout(t, 0.4, seed=SEED, backend="cpp"), (x,))


def test_cpp_writes_every_output_element():
    _need("cpp")
    lib = _ext.cpp_extension()
    lib.set_poison(True)
    try:
        y = dropout(torch.randn(3, 70001), 0.2, seed=SEED, backend="cpp")
    finally:
        lib.set_poison(False)
    assert not torch.isnan(y).any()


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_keep_rate_seeding_and_edge_cases(backend):
    _need(backend)
    x = torch.ones(400, 500)
    torch.manual_seed(3)
    a = dropout(x, 0.25, backend=backend)
    b = dropout(x, 0.25, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.25, backend=backend), a)  # seed=None follows torch.manual_seed
    assert not torch.equal(a, b)
    assert abs((a > 0).float().mean().item() - 0.75) < 0.01  # 2·10⁵ draws: σ ≈ 0.001
    assert set(a.unique().tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}  # fp32 1/(1 − p)
    assert dropout(x, 0.0, backend=backend) is x and dropout(x, 0.7, training=False, backend=backend) is x
    z = dropout(x.clone().requires_grad_(), 1.0, backend=backend)
    assert torch.equal(z, torch.zeros_like(x))


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(p=1.5), ValueError, "p must be"), (dict(p=-0.1), ValueError, "p must be"),
    (dict(seed=-1), ValueError, "seed must be"), (dict(seed=2**63), ValueError, "seed must be"),
])
def test_bad_arguments_raise_clearly(kwargs, err, match):
    with pytest.raises(err, match=match):
        dropout(torch.randn(3), **kwargs)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        dropout(torch.arange(3), 0.5)


def test_nn_dropout_is_a_drop_in():
    m = Dropout(0.4)
    assert isinstance(m, torch.nn.Dropout) and m.state_dict() == {} and "p=0.4" in repr(m)
    x = torch.randn(8, 16)
    m.eval()
    assert m(x) is x
    m.train()
    y = m(x)
    assert ((y == 0) | torch.isclose(y, x / 0.6)).all() and (y == 0).any()
    with pytest.raises(ValueError):
        Dropout(1.2)
