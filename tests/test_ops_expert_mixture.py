"""msa_fast.ops.expert_mixture / expert_mixture_topk vs the fp64 reference on the torch and cpp backends.

The Triton backend is covered by tests/test_triton_expert_mixture.py (interpreter on CPU, tiny shapes).
Error rule: a backend's error against the fp64 reference ≤ 2 × the same-dtype PyTorch reference's error + a floor
(msa_fast.testing.assert_close_to_reference), for the output and every gradient.
"""
import pytest
import torch

from msa_fast import _ext
from msa_fast.nn import ExpertMixture
from msa_fast.ops import expert_mixture, expert_mixture_topk
from msa_fast.testing import ATOL_FLOOR, assert_close_to_reference, available_backends
from msa_fast.testing.reference import expert_mixture_ref, expert_mixture_topk_ref

BACKENDS = available_backends(include_triton=False)
F64, F32, F16 = torch.float64, torch.float32, torch.float16


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not available here")
    if backend == "cpp" and not hasattr(_ext.cpp_extension(), "expert_mixture_forward"):
        pytest.skip("msa_fast._C was built before expert_mixture existed")


@pytest.fixture
def cpp_poison():
    """NaN-fill every output the C++ kernels allocate before they write it."""
    lib = _ext.cpp_extension()
    if lib is not None:
        lib.set_poison(True)
    yield
    if lib is not None:
        lib.set_poison(False)


def make_inputs(N, d, E, h, noncontig=False, dtype=F64):
    """x, gates, w1, b1, w2, b2 in float64 (O(1) outputs); with ``noncontig`` every tensor is a strided view."""
    def t(*shape, scale=1.0):
        if noncontig:  # stored with reversed dims, viewed back: no unit stride on the last dim
            return (torch.randn(*reversed(shape), dtype=F64) * scale).permute(*reversed(range(len(shape))))
        return torch.randn(*shape, dtype=F64) * scale
    x = t(N, d)
    gates = torch.softmax(t(N, E), -1)
    if noncontig:
        gates = gates.t().contiguous().t()
    return [v.to(dtype) for v in (x, gates, t(E, d, h, scale=d ** -0.5), t(E, h, scale=0.5),
                                  t(E, h, d, scale=h ** -0.5), t(E, d, scale=0.5))]


def rule(got, ref64, ref_dtype, name):
    """The 2x rule with the dtype's floor raised to one ulp of the largest reference value: a result rounded to
    fp16 carries up to half an ulp by itself, which the same-dtype torch result may happen to avoid for a
    single element (N = 1)."""
    floor = max(ATOL_FLOOR[got.dtype], torch.finfo(got.dtype).eps * ref64.abs().max().item())
    assert_close_to_reference(got, ref64, ref_dtype, name=name, atol=floor)


def check_against_reference(run, ref, inputs64, dtype, name):
    """run / ref take the float inputs; compares output and every gradient with the 2x rule."""
    def leaves(dt):
        return [v.detach().to(dt).requires_grad_(True) for v in inputs64]  # .to keeps strides (non-contiguous)

    x64, xd, xb = leaves(F64), leaves(dtype), leaves(dtype)
    o64, od, ob = ref(*x64, upcast=False), ref(*xd, upcast=False), run(*xb)
    assert ob.dtype == dtype and ob.shape == o64.shape
    rule(ob, o64, od, f"{name} out")
    cot = torch.randn_like(o64)
    g64 = torch.autograd.grad(o64, x64, cot)
    gd = torch.autograd.grad(od, xd, cot.to(dtype))
    gb = torch.autograd.grad(ob, xb, cot.to(dtype))
    for i, (a, b, c) in enumerate(zip(gb, g64, gd)):
        assert a is not None and a.dtype == dtype and a.shape == b.shape, f"{name} grad[{i}]"
        rule(a, b, c, f"{name} grad[{i}]")
    return gb


# (N, d, E, h, activation, noncontig)
DENSE_CASES = [
    (1, 12, 1, 20, "gelu", False),
    (7, 16, 4, 32, "relu", True),
    (33, 32, 8, 40, "gelu", True),
    (33, 64, 4, 64, "gelu", False),
    (7, 64, 8, 24, "relu", False),
]


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("N,d,E,h,act,noncontig", DENSE_CASES)
def test_dense_matches_fp64_reference(backend, N, d, E, h, act, noncontig, dtype, cpp_poison, poison_empty):
    _need(backend)
    inputs = make_inputs(N, d, E, h, noncontig)
    inputs[1][:, E // 2] = 0.0  # an expert no token uses: its weight gradients are exactly zero
    gb = check_against_reference(
        lambda *t: expert_mixture(*t, activation=act, backend=backend),
        lambda *t, upcast: expert_mixture_ref(*t, activation=act, upcast=upcast),
        inputs, dtype, f"{backend} dense N{N} d{d} E{E} {act}")
    _, _, dw1, db1, dw2, db2 = gb
    for g in (dw1, db1, dw2, db2):
        assert torch.equal(g[E // 2], torch.zeros_like(g[E // 2]))


# (N, d, E, h, k, activation, noncontig, empty experts)
TOPK_CASES = [
    (1, 12, 1, 20, 1, "gelu", False, ()),
    (7, 16, 4, 32, 2, "relu", True, (1,)),
    (33, 32, 8, 40, 2, "gelu", True, (0, 5, 7)),
    (33, 64, 4, 64, 1, "gelu", False, (2,)),
]


def _routing(N, E, k, empty):
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    idx = allowed[torch.randint(0, len(allowed), (N, k))]
    if k > 1 and N > 1:
        idx[0, 1] = idx[0, 0]  # the same expert twice in one row is allowed
    return idx


@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("N,d,E,h,k,act,noncontig,empty", TOPK_CASES)
def test_topk_matches_fp64_reference(backend, N, d, E, h, k, act, noncontig, empty, dtype, cpp_poison,
                                     poison_empty):
    _need(backend)
    x, _, w1, b1, w2, b2 = make_inputs(N, d, E, h, noncontig)
    idx = _routing(N, E, k, empty)
    wt = torch.rand(N, k, dtype=F64)
    if noncontig:
        wt = wt.t().contiguous().t()
    gb = check_against_reference(
        lambda x, wt, *w: expert_mixture_topk(x, idx, wt, *w, activation=act, backend=backend),
        lambda x, wt, *w, upcast: expert_mixture_topk_ref(x, idx, wt, *w, activation=act, upcast=upcast),
        [x, wt, w1, b1, w2, b2], dtype, f"{backend} topk N{N} d{d} E{E} k{k} {act}")
    for e in empty:  # no token routed to e: zero weight gradients, never NaN / garbage
        for g in gb[2:]:
            assert torch.equal(g[e], torch.zeros_like(g[e]))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_gradcheck(backend, act):
    _need(backend)
    x, g, w1, b1, w2, b2 = (t.requires_grad_() for t in make_inputs(5, 6, 3, 7))
    assert torch.autograd.gradcheck(lambda *t: expert_mixture(*t, activation=act, backend=backend),
                                    (x, g, w1, b1, w2, b2))
    idx = torch.tensor([[0, 2], [2, 2], [0, 0], [2, 0], [0, 2]])  # expert 1 empty
    wt = torch.rand(5, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, wt, *w: expert_mixture_topk(x, idx, wt, *w, activation=act, backend=backend),
        (x, wt, w1, b1, w2, b2))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_backends_agree_and_auto_dispatch(backend):
    _need(backend)
    inputs = make_inputs(9, 16, 4, 24, dtype=F32)
    ref = expert_mixture(*inputs, backend="torch")
    torch.testing.assert_close(expert_mixture(*inputs, backend=backend), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expert_mixture(*inputs), ref, rtol=1e-5, atol=1e-5)  # auto: cpp on CPU when built
    # a dense mixture with one-hot gates equals top-1 routing with weight 1
    idx = torch.randint(0, 4, (9, 1))
    onehot = torch.nn.functional.one_hot(idx[:, 0], 4).float()
    torch.testing.assert_close(expert_mixture_topk(inputs[0], idx, torch.ones(9, 1), *inputs[2:], backend=backend),
                               expert_mixture(inputs[0], onehot, *inputs[2:], backend=backend), rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_value_errors():
    x, g, w1, b1, w2, b2 = make_inputs(4, 8, 3, 5, dtype=F32)
    idx, wt = torch.zeros(4, 2, dtype=torch.long), torch.rand(4, 2)
    cases = [
        (lambda: expert_mixture(x[0], g, w1, b1, w2, b2), r"x must be 2-D \(N, d\)"),
        (lambda: expert_mixture(x, g[:, :2], w1, b1, w2, b2), r"gates must have shape \(N, E\) = \(4, 3\)"),
        (lambda: expert_mixture(x, g, w1[:, :7], b1, w2, b2), r"w1 must have shape \(E, d, h\) with d = 8"),
        (lambda: expert_mixture(x, g, w1, b1[:, :4], w2, b2), r"b1 must have shape \(E, h\)"),
        (lambda: expert_mixture(x, g, w1, b1, w2.transpose(1, 2), b2), r"w2 must have shape \(E, h, d\)"),
        (lambda: expert_mixture(x, g, w1, b1, w2, b2[:2]), r"b2 must have shape \(E, d\)"),
        (lambda: expert_mixture(x, g.double(), w1, b1, w2, b2), r"gates has dtype torch.float64 but x has"),
        (lambda: expert_mixture(x.long(), g, w1, b1, w2, b2), r"x must be a floating tensor"),
        (lambda: expert_mixture(x, g, w1, b1, w2, b2, activation="tanh"), r"activation must be one of"),
        (lambda: expert_mixture(x, g, w1, b1, w2, b2, backend="cuda"), r"backend must be one of"),
        (lambda: expert_mixture_topk(x, idx.float(), wt, w1, b1, w2, b2), r"expert_idx must be an integer"),
        (lambda: expert_mixture_topk(x, idx[:3], wt, w1, b1, w2, b2), r"expert_idx must have shape \(N, k\)"),
        (lambda: expert_mixture_topk(x, idx, wt[:, :1], w1, b1, w2, b2), r"expert_weight must have shape"),
        (lambda: expert_mixture_topk(x, idx + 3, wt, w1, b1, w2, b2), r"expert_idx must lie in \[0, 3\)"),
        (lambda: expert_mixture_topk(x, idx - 1, wt, w1, b1, w2, b2), r"expert_idx must lie in \[0, 3\).*min -1"),
        (lambda: expert_mixture_topk(x, idx, wt.half(), w1, b1, w2, b2), r"expert_weight has dtype"),
    ]
    if torch.cuda.is_available():
        cases.append((lambda: expert_mixture(x, g.cuda(), w1, b1, w2, b2), r"gates is on cuda"))
    for fn, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fn()
    with pytest.raises(TypeError, match="w2 must be a torch.Tensor"):
        expert_mixture(x, g, w1, b1, w2.tolist(), b2)


def test_meta_device_mismatch_is_a_value_error():
    x, g, w1, b1, w2, b2 = make_inputs(4, 8, 3, 5, dtype=F32)
    with pytest.raises(ValueError, match=r"b1 is on meta but x is on cpu"):
        expert_mixture(x, g, w1, b1.to("meta"), w2, b2)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_module(backend):
    _need(backend)
    m = ExpertMixture(16, 24, 4, activation="gelu", backend=backend).double()
    x = torch.randn(2, 5, 16, dtype=F64)
    gates = torch.softmax(torch.randn(2, 5, 4, dtype=F64), -1)
    out = m(x, gates)
    assert out.shape == (2, 5, 16)
    ref = expert_mixture_ref(x.reshape(10, 16), gates.reshape(10, 4), m.w1, m.b1, m.w2, m.b2)
    torch.testing.assert_close(out, ref.reshape(2, 5, 16))
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    idx, wt = torch.randint(0, 4, (2, 5, 2)), torch.rand(2, 5, 2, dtype=F64)
    out = m(x, expert_idx=idx, expert_weight=wt)
    ref = expert_mixture_topk_ref(x.reshape(10, 16), idx.reshape(10, 2), wt.reshape(10, 2), m.w1, m.b1, m.w2, m.b2)
    torch.testing.assert_close(out, ref.reshape(2, 5, 16))
    with pytest.raises(ValueError, match="gates must have shape"):
        m(x, gates[..., :3])
    with pytest.raises(ValueError, match="not both"):
        m(x, gates, expert_idx=idx, expert_weight=wt)
    assert "num_experts=4" in repr(m)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_no_tokens(backend, cpp_poison):
    _need(backend)
    x, g, w1, b1, w2, b2 = (t.requires_grad_() for t in make_inputs(0, 8, 3, 5, dtype=F32))
    out = expert_mixture(x, g, w1, b1, w2, b2, backend=backend)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (w1, b1, w2, b2))
    wt = torch.rand(0, 2, requires_grad=True)
    out = expert_mixture_topk(x, torch.zeros(0, 2, dtype=torch.long), wt, w1, b1, w2, b2, backend=backend)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert wt.grad.shape == (0, 2) and not torch.isnan(w1.grad).any()
