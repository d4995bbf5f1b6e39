"""Triton segmented attention core (msa_fast.kernels.attention) vs the fp64 reference.

Runs on CUDA when present, else on CPU under TRITON_INTERPRET=1 (set by conftest.py). The interpreter cannot do bf16
arithmetic, so bf16 runs only on CUDA. Shapes are tiny (the interpreter runs programs serially); small tile
overrides (block 16) make the tiny shapes span several query/key blocks and source boundaries.
"""
import math

import pytest
import torch

from msa_fast.testing.reference import attention_ref, dropout_keep_mask, multi_source_attention_ref

attn = pytest.importorskip("msa_fast.kernels.attention")

pytestmark = pytest.mark.interpret

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# id, dtype, B, H, Lq, source lengths, D, non-contiguous layout, tile override
CASES = [
    ("fp32-d12-3src-b16-noncontig", F32, 2, 2, 37, (20, 0, 29), 12, True, 16),
    ("fp16-d16-2src-b16", F16, 2, 1, 23, (17, 33), 16, False, 16),
    ("fp32-d32-1src-default", F32, 2, 2, 50, (45,), 32, False, None),
    ("fp16-d64-2src-default-noncontig", F16, 1, 2, 9, (5, 40), 64, True, None),
    ("fp32-d64-2src-b16", F32, 1, 1, 20, (3, 18), 64, False, 16),
    ("bf16-d32-3src-default", BF16, 2, 2, 40, (10, 30, 7), 32, True, None),
    # Head dims 65..128 (padded to 128): tiny shapes, the interpreter's cost grows with the 128-wide tiles.
    ("fp32-d96-2src-b16", F32, 1, 1, 18, (5, 14), 96, False, 16),
    ("fp16-d96-1src-default-noncontig", F16, 1, 2, 9, (21,), 96, True, None),
    ("fp32-d128-2src-default-noncontig", F32, 2, 1, 7, (0, 40), 128, True, None),
    ("fp16-d128-3src-b16", F16, 1, 1, 20, (3, 17, 6), 128, False, 16),
    ("bf16-d128-2src-default", BF16, 2, 2, 40, (33, 9), 128, False, None),
]


def _offsets(lens):
    offs = [0]
    for n in lens:
        offs.append(offs[-1] + n)
    return tuple(offs)


def _rand(B, H, L, D, noncontig):
    if noncontig:  # a (B, L, H, D) tensor viewed as (B, H, L, D): unit stride along D only
        return torch.randn(B, L, H, D, dtype=torch.float64).transpose(1, 2)
    return torch.randn(B, H, L, D, dtype=torch.float64)


def _make_case(B, H, Lq, lens, D, dtype, device, noncontig):
    offs = _offsets(lens)
    Lk = offs[-1]
    q, k, v = _rand(B, H, Lq, D, noncontig), _rand(B, H, Lk, D, noncontig), _rand(B, H, Lk, D, noncontig)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))  # keeps the strided layout
    # Ragged key padding per (sample, source): a valid prefix of random length; the last sample's last source is
    # fully padded (rows with no valid key there must give zeros, never NaN).
    key_valid = torch.zeros(B, Lk, dtype=torch.bool)
    for b in range(B):
        for s, (a, e) in enumerate(zip(offs, offs[1:])):
            if e == a or (b == B - 1 and s == len(lens) - 1):
                continue
            n = int(torch.randint(1, e - a + 1, ()).item())
            key_valid[b, a:a + n] = True
    q_valid = torch.ones(B, Lq, dtype=torch.bool)
    q_valid[0, Lq - max(1, Lq // 4):] = False  # padded query rows
    return q, k, v, key_valid.to(device), q_valid.to(device), offs


def _sources(k, v, key_valid, offs):
    return [(k[:, :, a:e], v[:, :, a:e], ~key_valid[:, a:e]) for a, e in zip(offs, offs[1:]) if e > a]


def _lse_ref(q, k, key_valid, q_valid, offs, scale):
    """(B, H, S, Lq) fp64 logsumexp per source; +inf where no valid key or the row is padding."""
    B, H, Lq, _ = q.shape
    out = torch.full((B, H, len(offs) - 1, Lq), math.inf, dtype=torch.float64, device=q.device)
    for s, (a, e) in enumerate(zip(offs, offs[1:])):
        if e == a:
            continue
        sc = (q.double() @ k[:, :, a:e].double().transpose(-1, -2)) * scale
        sc = sc.masked_fill(~key_valid[:, None, None, a:e], -math.inf)
        lse = torch.logsumexp(sc, -1)
        out[:, :, s] = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, math.inf))
    return out.masked_fill(~q_valid[:, None, None, :], math.inf)


def _check_lse(got, ref):
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), "lse: +inf pattern differs from the reference"
    assert not torch.isnan(got).any()
    fin = torch.isfinite(ref)
    if fin.any():
        err = (got.double()[fin] - ref[fin]).abs().max().item()
        assert err <= 1e-4 * max(1.0, ref[fin].abs().max().item()), f"lse error {err:.3e}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_match_fp64_reference(case, triton_device, poison_empty, error_rule):
    _, dtype, B, H, Lq, lens, D, noncontig, blk = case
    if dtype == BF16 and triton_device == "cpu":
        pytest.skip("the Triton interpreter cannot do bf16 arithmetic")
    q, k, v, key_valid, q_valid, offs = _make_case(B, H, Lq, lens, D, dtype, triton_device, noncontig)
    S = len(offs) - 1
    scale = D ** -0.5

    out, lse, o_src = attn.forward(q, k, v, key_valid, offs, q_valid, scale, block_m=blk, block_n=blk)

    # fp64 reference on the same (rounded) inputs, and the same-dtype torch reference for the error budget.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref64 = multi_source_attention_ref(q64, _sources(k64, v64, key_valid, offs), scale, ~q_valid, upcast=True)
    ref_dt = multi_source_attention_ref(qs, _sources(ks, vs, key_valid, offs), scale, ~q_valid)
    assert out.dtype == dtype and lse.dtype == torch.float32
    error_rule("out", out, ref64, ref_dt)
    _check_lse(lse, _lse_ref(q, k, key_valid, q_valid, offs, scale))
    if S == 1:
        assert o_src is None
        o_s = out.float()[None]
    else:
        assert o_src.shape == (S, B, H, Lq, D) and o_src.dtype == torch.float32
        for s, (a, e) in enumerate(zip(offs, offs[1:])):
            if e == a:
                assert (o_src[s] == 0).all()
                continue
            mask = ~key_valid[:, a:e]
            r64 = attention_ref(q64, k64[:, :, a:e], v64[:, :, a:e], mask, ~q_valid, scale, upcast=True)
            rdt = attention_ref(qs, ks[:, :, a:e], vs[:, :, a:e], mask, ~q_valid, scale)
            error_rule(f"o_src[{s}]", o_src[s], r64.detach(), rdt.detach())
        o_s = o_src

    # Backward: delta as the contract layer computes it, from the kernel's own per-source outputs.
    dout = torch.randn(B, H, Lq, D, dtype=torch.float64).to(device=triton_device, dtype=dtype)
    delta = (dout.float()[None] * o_s).sum(-1).permute(1, 2, 0, 3).contiguous()
    dq, dk, dv = attn.backward(q, k, v, key_valid, offs, q_valid, scale, lse, delta, dout,
                               block_m=blk, block_n=blk)
    g64 = torch.autograd.grad(ref64, (q64, k64, v64), dout.double())
    gdt = torch.autograd.grad(ref_dt, (qs, ks, vs), dout)
    for name, got, r64, rdt, like in zip(("dq", "dk", "dv"), (dq, dk, dv), g64, gdt, (q, k, v)):
        assert got.dtype == like.dtype and got.shape == like.shape
        error_rule(name, got, r64, rdt)
    # Padded keys get exactly zero gradient; padded query rows too.
    assert (dk.permute(0, 2, 1, 3)[~key_valid] == 0).all() and (dv.permute(0, 2, 1, 3)[~key_valid] == 0).all()
    assert (dq.permute(0, 2, 1, 3)[~q_valid] == 0).all()


def test_all_keys_padded_gives_zeros_not_nan(triton_device, poison_empty):
    B, H, Lq, D, lens = 1, 1, 5, 16, (4, 6)
    offs = _offsets(lens)
    q, k, v = (torch.randn(B, H, L, D, device=triton_device) for L in (Lq, 10, 10))
    key_valid = torch.zeros(B, 10, dtype=torch.bool, device=triton_device)
    out, lse, o_src = attn.forward(q, k, v, key_valid, offs, None, 0.25)
    assert (out == 0).all() and torch.isinf(lse).all() and (lse > 0).all() and (o_src == 0).all()
    delta = torch.zeros(B, H, 2, Lq, device=triton_device)
    grads = attn.backward(q, k, v, key_valid, offs, None, 0.25, lse, delta, torch.randn_like(q))
    for g in grads:
        assert (g == 0).all()


def test_invalid_arguments_raise(triton_device):
    q = torch.randn(1, 1, 4, 129, device=triton_device)
    kv = torch.ones(1, 4, dtype=torch.bool, device=triton_device)
    with pytest.raises(ValueError, match="head dim"):
        attn.forward(q, q, q, kv, (0, 4), None, 1.0)
    q = torch.randn(1, 1, 4, 16, device=triton_device)
    with pytest.raises(ValueError, match="src_offsets"):
        attn.forward(q, q, q, kv, (0, 3), None, 1.0)
    with pytest.raises(ValueError, match="key_valid"):
        attn.forward(q, q, q, kv[:, :3], (0, 4), None, 1.0)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        attn.forward(q, q.half(), q, kv, (0, 4), None, 1.0)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("d", [8, 12, 16, 32, 64, 96, 128])
def test_launcher_configs_are_listed_for_aot(dtype, d):
    """Every tile config the launchers can pick appears in AOT_CONFIGS (so the AOT test checks it)."""
    from msa_fast.kernels import block_d

    bd = block_d(d)
    listed = {(c["name"].split(".")[1], c["constexprs"]["BLOCK_D"], c["constexprs"]["BLOCK_M"],
               c["constexprs"]["BLOCK_N"], c["constexprs"]["DROPOUT"], c["num_warps"], c["num_stages"])
              for c in attn.AOT_CONFIGS}
    for kind in ("fwd", "dkdv", "dq"):
        for dropout in (False, True):
            cfg = attn._launch_cfg(kind, bd, dtype, None, None, dropout)
            assert (kind, bd, cfg["BLOCK_M"], cfg["BLOCK_N"], dropout, cfg["num_warps"], cfg["num_stages"]) in listed


DROPOUT_CASES = [  # id, dtype, B, H, Lq, source lengths, D, tile override
    ("fp32-d16-1src-b16", F32, 2, 2, 21, (37,), 16, 16),
    ("fp16-d32-2src-default", F16, 1, 2, 19, (9, 30), 32, None),
    ("fp32-d12-2src-b16-crossing", F32, 1, 1, 17, (20, 15), 12, 16),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=[c[0] for c in DROPOUT_CASES])
def test_in_kernel_dropout_matches_reference_with_the_counter_mask(case, triton_device, poison_empty, error_rule):
    """dropout=(p, seed): forward and dq/dk/dv equal the reference applying dropout_keep_mask(seed, (B, H, Lq, Lk),
    p) per source (the same mask the C++ kernel draws), ragged keys, a fully padded source, padded queries."""
    _, dtype, B, H, Lq, lens, D, blk = case
    q, k, v, key_valid, q_valid, offs = _make_case(B, H, Lq, lens, D, dtype, triton_device, False)
    p, seed, scale = 0.3, 0xDEAD_BEEF_1234, D ** -0.5
    mask = dropout_keep_mask(seed, (B, H, Lq, offs[-1]), p).to(triton_device)
    out, lse, o_src = attn.forward(q, k, v, key_valid, offs, q_valid, scale, (p, seed), block_m=blk, block_n=blk)

    def ref(q, k, v, upcast):
        parts = [attention_ref(q, k[:, :, a:e], v[:, :, a:e], ~key_valid[:, a:e], ~q_valid, scale, dropout_p=p,
                               upcast=upcast, dropout_mask=mask[..., a:e]) for a, e in zip(offs, offs[1:])]
        return parts, sum(parts)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    parts64, ref64 = ref(q64, k64, v64, True)
    _, ref_dt = ref(qs, ks, vs, False)
    error_rule("out", out, ref64, ref_dt)
    o_s = out.float()[None] if o_src is None else o_src
    for s, part in enumerate(parts64 if o_src is not None else []):
        error_rule(f"o_src[{s}]", o_src[s], part.detach(), part.detach().to(dtype))
    dout = torch.randn(B, H, Lq, D, dtype=torch.float64).to(device=triton_device, dtype=dtype)
    delta = (dout.float()[None] * o_s).sum(-1).permute(1, 2, 0, 3).contiguous()
    grads = attn.backward(q, k, v, key_valid, offs, q_valid, scale, lse, delta, dout, (p, seed),
                          block_m=blk, block_n=blk)
    g64 = torch.autograd.grad(ref64, (q64, k64, v64), dout.double())
    gdt = torch.autograd.grad(ref_dt, (qs, ks, vs), dout)
    for name, got, r64, rdt in zip(("dq", "dk", "dv"), grads, g64, gdt):
        error_rule(name, got, r64, rdt)


rng = pytest.importorskip("msa_fast.kernels.counter_rng")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _counter_rng_probe(ROWS, OUT, Lk, seed_lo, seed_hi, keep_thr, inv_keep, R: tl.constexpr, C: tl.constexpr):
    r = tl.arange(0, R)
    c = tl.arange(0, C)
    lo, hi = rng.row_counter(tl.load(ROWS + r), Lk)
    z = rng.dropout_scale(lo[:, None], hi[:, None], c[None, :], seed_lo, seed_hi, keep_thr, inv_keep)
    tl.store(OUT + r[:, None] * C + c[None, :], z)


def test_counter_rng_jit_equals_reference_across_the_high_word(triton_device):
    """kernels.counter_rng.dropout_scale (32-bit halves + carry) equals counter_rng_bits on 64-bit counters, for
    rows whose counters cross 2³² inside the row (unreachable by the small attention tests)."""
    from msa_fast.testing.reference import counter_rng_bits, dropout_keep_threshold

    p, seed, lk = 0.5, 0x0123_4567_89AB_CDEF, 3_000_000_017  # rows·Lk reach past 2³² and 2³³
    rows = torch.tensor([0, 1, 2, 3, 5, 7, 11, 1431655765], dtype=torch.int64)
    out = torch.full((8, 64), float("nan"), device=triton_device)
    _counter_rng_probe[(1,)](rows.to(triton_device), out, lk, *rng.dropout_args((p, seed)), R=8, C=64)
    n = rows[:, None] * lk + torch.arange(64)[None, :]
    want = (counter_rng_bits(seed, n) >= dropout_keep_threshold(p)).float() * 2.0
    assert torch.equal(out.cpu(), want)
