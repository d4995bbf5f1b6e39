"""Triton expert mixture (msa_fast.kernels.expert_mixture) vs the fp64 reference, through ``backend="triton"``.

CUDA when present, else CPU under TRITON_INTERPRET=1 (tiny shapes: the interpreter runs each program in Python;
bf16 only on CUDA). ``poison_empty`` NaN-fills every torch.empty, so an output element a kernel forgets to write
(the empty-expert weight gradients, ragged row / column tails) shows up as NaN.
"""
import pytest
import torch

from msa_fast.ops import expert_mixture, expert_mixture_topk
from msa_fast.testing import ATOL_FLOOR, assert_close_to_reference
from msa_fast.testing.reference import expert_mixture_ref, expert_mixture_topk_ref

em = pytest.importorskip("msa_fast.kernels.expert_mixture")

pytestmark = pytest.mark.interpret

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


def _inputs(N, d, E, h, noncontig, device):
    def t(*shape, scale=1.0):
        if noncontig:
            return (torch.randn(*reversed(shape), dtype=F64) * scale).permute(*reversed(range(len(shape))))
        return torch.randn(*shape, dtype=F64) * scale
    x = t(N, d)
    gates = torch.softmax(torch.randn(N, E, dtype=F64), -1)
    return [v.to(device) for v in (x, gates, t(E, d, h, scale=d ** -0.5), t(E, h, scale=0.5),
                                   t(E, h, d, scale=h ** -0.5), t(E, d, scale=0.5))]


def _rule(got, ref64, ref_dt, name):
    # floor: one ulp of the largest reference value (the output's own rounding; see test_ops_expert_mixture.py)
    floor = max(ATOL_FLOOR[got.dtype], torch.finfo(got.dtype).eps * ref64.abs().max().item())
    assert_close_to_reference(got, ref64, ref_dt, name=name, atol=floor)


def _check(run, ref, inputs64, dtype, name):
    def leaves(dt):
        return [v.detach().to(dt).requires_grad_(True) for v in inputs64]

    x64, xd, xb = leaves(F64), leaves(dtype), leaves(dtype)
    ref_dt_inputs = [v.detach().cpu().requires_grad_(True) for v in xd]  # same-dtype torch reference on CPU
    o64, od, ob = ref(*x64), ref(*ref_dt_inputs), run(*xb)
    assert ob.dtype == dtype and ob.shape == o64.shape
    _rule(ob, o64, od, f"{name} out")
    cot = torch.randn_like(o64)
    g64 = torch.autograd.grad(o64, x64, cot)
    gd = torch.autograd.grad(od, ref_dt_inputs, cot.cpu().to(dtype))
    gb = torch.autograd.grad(ob, xb, cot.to(dtype))
    for i, (a, b, c) in enumerate(zip(gb, g64, gd)):
        assert a.dtype == dtype and a.shape == b.shape
        _rule(a, b, c, f"{name} grad[{i}]")
    return gb


def _skip_bf16(dtype, device):
    if dtype == BF16 and device == "cpu":
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")


# N, d, E, h, activation, noncontig
DENSE = [
    (1, 12, 1, 20, "gelu", False),
    (7, 16, 4, 24, "relu", True),
    (33, 32, 8, 40, "gelu", False),
    (7, 64, 4, 70, "gelu", True),   # h spans two 64-wide hidden blocks, d = 64
    (70, 16, 4, 16, "relu", False),  # N spans two 64-row tiles
]


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("N,d,E,h,act,noncontig", DENSE)
def test_dense_matches_fp64_reference(N, d, E, h, act, noncontig, dtype, triton_device, poison_empty):
    _skip_bf16(dtype, triton_device)
    inputs = _inputs(N, d, E, h, noncontig, triton_device)
    if E > 1:
        inputs[1][:, 1] = 0.0  # gates zero for expert 1
    gb = _check(lambda *t: expert_mixture(*t, activation=act, backend="triton"),
                lambda *t: expert_mixture_ref(*t, activation=act, upcast=t[0].dtype == F64),
                inputs, dtype, f"dense N{N} d{d} E{E} h{h} {act} {dtype}")
    if E > 1:
        for g in gb[2:]:
            assert torch.equal(g[1], torch.zeros_like(g[1]))


# N, d, E, h, k, activation, noncontig, experts with no token
TOPK = [
    (1, 12, 1, 20, 1, "gelu", False, ()),
    (7, 16, 4, 24, 2, "relu", True, (1, 3)),
    (33, 32, 8, 40, 2, "gelu", False, (0, 6)),
    (33, 64, 4, 70, 1, "gelu", True, (2,)),
    (70, 16, 4, 16, 2, "relu", False, ()),  # 140 slots: several row tiles per expert
]


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("N,d,E,h,k,act,noncontig,empty", TOPK)
def test_topk_matches_fp64_reference(N, d, E, h, k, act, noncontig, empty, dtype, triton_device, poison_empty):
    _skip_bf16(dtype, triton_device)
    x, _, w1, b1, w2, b2 = _inputs(N, d, E, h, noncontig, triton_device)
    allowed = torch.tensor([e for e in range(E) if e not in empty])
    idx = allowed[torch.randint(0, len(allowed), (N, k))].to(triton_device)
    wt = torch.rand(N, k, dtype=F64).to(triton_device)
    idx_cpu = idx.cpu()
    gb = _check(lambda x, wt, *w: expert_mixture_topk(x, idx, wt, *w, activation=act, backend="triton"),
                lambda x, wt, *w: expert_mixture_topk_ref(x, idx if x.device == idx.device else idx_cpu, wt, *w,
                                                          activation=act, upcast=x.dtype == F64),
                [x, wt, w1, b1, w2, b2], dtype, f"topk N{N} d{d} E{E} k{k} {act} {dtype}")
    for e in empty:
        for g in gb[2:]:
            assert torch.equal(g[e], torch.zeros_like(g[e]))


@pytest.mark.parametrize("M,E", [(1, 1), (7, 4), (300, 8), (513, 3)])
def test_permute_is_a_stable_sort_with_offsets(M, E, triton_device):
    idx = torch.randint(0, E, (M,), device=triton_device)
    if E > 2:
        idx[idx == 1] = 0  # an empty expert
    order, pos, offs, toffs = em.permute(idx, E, tile_m=16)
    ref = torch.sort(idx.cpu(), stable=True).indices
    assert torch.equal(order.cpu().long(), ref)
    assert torch.equal(pos.cpu().long()[ref], torch.arange(M))
    counts = torch.bincount(idx.cpu(), minlength=E)
    assert torch.equal(offs.cpu().long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    tiles = (counts + 15) // 16
    assert torch.equal(toffs.cpu().long(), torch.cat([torch.zeros(1, dtype=torch.long), tiles.cumsum(0)]))


def test_float64_and_bad_arguments(triton_device):
    x, g, w1, b1, w2, b2 = _inputs(4, 16, 3, 16, False, triton_device)
    with pytest.raises(ValueError, match="backend='triton' takes fp32 / fp16 / bf16"):
        expert_mixture(x, g, w1, b1, w2, b2, backend="triton")
    x, g, w1, b1, w2, b2 = (t.float() for t in (x, g, w1, b1, w2, b2))
    with pytest.raises(ValueError, match=r"expert_idx must lie in \[0, 3\)"):
        expert_mixture_topk(x, torch.full((4, 1), 3, device=triton_device), g[:, :1], w1, b1, w2, b2,
                            backend="triton")
    with pytest.raises(ValueError, match="at most 64 experts"):
        em.permute(torch.zeros(4, dtype=torch.long, device=triton_device), 65)
