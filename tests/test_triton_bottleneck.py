"""Triton bottleneck exchange (msa_fast.kernels.bottleneck_exchange) vs the fp64 reference.

CUDA when present, else CPU under TRITON_INTERPRET=1 (bf16 only on CUDA: the interpreter cannot do bf16 math).
"""
import pytest
import torch

from msa_fast.testing.reference import bottleneck_exchange_ref

bx = pytest.importorskip("msa_fast.kernels.bottleneck_exchange")

pytestmark = pytest.mark.interpret

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# id, dtype, B, H, segment lengths, K, D, non-contiguous, row-block override
CASES = [
    ("fp32-d12-k5-3seg-b16-noncontig", F32, 2, 2, (7, 0, 30), 5, 12, True, 16),
    ("fp16-d16-k16-2seg-b16", F16, 2, 1, (20, 13), 16, 16, False, 16),
    ("fp32-d32-k1-3seg-default", F32, 1, 2, (50, 11, 3), 1, 32, False, None),
    ("fp16-d64-k8-2seg-default-noncontig", F16, 2, 1, (9, 40), 8, 64, True, None),
    ("bf16-d32-k4-3seg-default", BF16, 2, 2, (50, 37, 61), 4, 32, False, None),
    # Head dims 65..128 (padded to 128): tiny shapes.
    ("fp32-d96-k3-2seg-b16", F32, 1, 1, (9, 20), 3, 96, False, 16),
    ("fp16-d96-k16-2seg-default-noncontig", F16, 2, 1, (12, 5), 16, 96, True, None),
    ("fp32-d128-k8-3seg-default-noncontig", F32, 2, 1, (10, 0, 35), 8, 128, True, None),
    ("fp16-d128-k5-2seg-b16", F16, 1, 2, (17, 6), 5, 128, False, 16),
    ("bf16-d128-k8-2seg-default", BF16, 2, 2, (40, 70), 8, 128, False, None),
]


def _offsets(lens):
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    return tuple(offs)


def _make_case(B, H, lens, K, D, dtype, device, noncontig):
    offs = _offsets(lens)
    Lq, M = offs[-1], len(lens)
    if noncontig:  # (B, L, H, D) viewed as (B, H, L, D); keys (B, M, K, H, D) viewed as (B, H, M, K, D)
        q = torch.randn(B, Lq, H, D, dtype=torch.float64).transpose(1, 2)
        k, v = (torch.randn(B, M, K, H, D, dtype=torch.float64).permute(0, 3, 1, 2, 4) for _ in range(2))
    else:
        q = torch.randn(B, H, Lq, D, dtype=torch.float64)
        k, v = (torch.randn(B, H, M, K, D, dtype=torch.float64) for _ in range(2))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    key_valid = torch.rand(B, K) > 0.3
    key_valid[:, 0] = True
    if B > 1:
        key_valid[B - 1] = False  # a sample with no valid bottleneck key: zeros, never NaN
    q_valid = torch.ones(B, Lq, dtype=torch.bool)
    for a, e in zip(offs, offs[1:]):  # ragged modality lengths: padded tail per segment
        if e - a > 1:
            q_valid[0, e - (e - a) // 3:e] = False
    return q, k, v, key_valid.to(device), q_valid.to(device), offs


def _ref(q, k, v, key_valid, q_valid, offs, scale, upcast):
    segs = [(m, a, e) for m, (a, e) in enumerate(zip(offs, offs[1:])) if e > a]
    outs = bottleneck_exchange_ref([q[:, :, a:e] for _, a, e in segs], [k[:, :, m] for m, _, _ in segs],
                                   [v[:, :, m] for m, _, _ in segs], [~q_valid[:, a:e] for _, a, e in segs],
                                   ~key_valid, scale=scale, upcast=upcast)
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_match_fp64_reference(case, triton_device, poison_empty, error_rule):
    _, dtype, B, H, lens, K, D, noncontig, blk = case
    if dtype == BF16 and triton_device == "cpu":
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")
    q, k, v, key_valid, q_valid, offs = _make_case(B, H, lens, K, D, dtype, triton_device, noncontig)
    scale = D ** -0.5

    out, lse = bx.forward(q, offs, k, v, key_valid, q_valid, scale, block_m=blk)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref64 = _ref(q64, k64, v64, key_valid, q_valid, offs, scale, upcast=True)
    ref_dt = _ref(qs, ks, vs, key_valid, q_valid, offs, scale, upcast=False)
    assert out.dtype == dtype
    error_rule("out", out, ref64, ref_dt)

    # lse: per-row logsumexp over the own segment's valid keys; +inf for padded rows / no valid key.
    seg_of_row = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)).to(triton_device)
    ksel = k64.detach()[:, :, seg_of_row]  # (B, H, Lq, K, D)
    sc = torch.einsum("bhld,bhlkd->bhlk", q64.detach(), ksel) * scale
    lse_ref = torch.logsumexp(sc.masked_fill(~key_valid[:, None, None, :], float("-inf")), -1)
    lse_ref = lse_ref.masked_fill(~torch.isfinite(lse_ref) | ~q_valid[:, None, :], float("inf"))
    assert lse.shape == (B, H, offs[-1]) and torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    fin = torch.isfinite(lse_ref)
    if fin.any():
        assert (lse.double()[fin] - lse_ref[fin]).abs().max().item() <= 1e-4 * max(1.0, lse_ref[fin].abs().max())

    dout = torch.randn(out.shape, dtype=torch.float64).to(device=triton_device, dtype=dtype)
    delta = (dout.float() * out.float()).sum(-1)
    dq, dk, dv = bx.backward(q, offs, k, v, key_valid, q_valid, scale, lse, delta, dout, block_m=blk)
    g64 = torch.autograd.grad(ref64, (q64, k64, v64), dout.double(), allow_unused=True)
    gdt = torch.autograd.grad(ref_dt, (qs, ks, vs), dout, allow_unused=True)
    for name, got, r64, rdt, like in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gdt, (q, k, v)):
        assert got.dtype == like.dtype and got.shape == like.shape
        r64 = torch.zeros_like(like, dtype=torch.float64) if r64 is None else r64
        rdt = torch.zeros_like(like) if rdt is None else rdt
        error_rule(name, got, r64, rdt)
    # Empty segments and padded keys get exactly zero key gradients.
    for m, n in enumerate(lens):
        if n == 0:
            assert (dk[:, :, m] == 0).all() and (dv[:, :, m] == 0).all()
    assert (dk.permute(0, 3, 1, 2, 4)[~key_valid] == 0).all()


def test_invalid_arguments_raise(triton_device):
    q = torch.randn(1, 1, 6, 16, device=triton_device)
    k = torch.randn(1, 1, 2, 17, 16, device=triton_device)
    with pytest.raises(ValueError, match="bottleneck keys"):
        bx.forward(q, (0, 3, 6), k, k, None, None, 1.0)
    k = torch.randn(1, 1, 2, 4, 16, device=triton_device)
    with pytest.raises(ValueError, match="segments"):
        bx.forward(q, (0, 6), k, k, None, None, 1.0)
    with pytest.raises(ValueError, match="q_offsets"):
        bx.forward(q, (0, 4, 3), k, k, None, None, 1.0)
    q, k = torch.randn(1, 1, 6, 129, device=triton_device), torch.randn(1, 1, 2, 4, 129, device=triton_device)
    with pytest.raises(ValueError, match="head dim"):
        bx.forward(q, (0, 3, 6), k, k, None, None, 1.0)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("d", [4, 12, 16, 32, 64, 96, 128])
def test_launcher_configs_are_listed_for_aot(dtype, d):
    from msa_fast.kernels import block_d

    bd = block_d(d)
    listed = {(c["name"].split(".")[1], c["constexprs"]["BLOCK_D"], c["constexprs"]["BLOCK_M"], c["num_warps"],
               c["num_stages"]) for c in bx.AOT_CONFIGS}
    for kind in ("fwd", "bwd"):
        cfg = bx._config(kind, bd, dtype == F32)
        assert (kind, bd, cfg["BLOCK_M"], cfg["num_warps"], cfg["num_stages"]) in listed
