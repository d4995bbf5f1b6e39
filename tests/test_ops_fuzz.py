"""Property-based fuzzing (hypothesis) of shapes, lengths and masks for the C++ and torch backends vs the fp64
reference (outputs and gradients, error rule of msa_fast.testing), and of NaN / inf inputs on every backend (Triton
too, under the interpreter on CPU) and on the auto route to torch SDPA."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msa_fast.ops import attention, bottleneck_exchange, masked_mean, multi_source_attention
from msa_fast.testing import (ATOL_FLOOR, assert_close_to_reference, available_backends, compare_with_reference,
                              forward_backward_triplet)
from msa_fast.testing.reference import (attention_ref, bottleneck_exchange_ref, masked_mean_ref,
                                        multi_source_attention_ref)

BACKENDS = [b for b in available_backends(include_triton=False)]
FUZZ = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _mask(draw, B, L):
    """Random bool mask (True = padding), any pattern (not only suffixes)."""
    bits = draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))
    return torch.tensor(bits, dtype=torch.bool).view(B, L)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_attention(backend, data):
    d = data.draw
    B, H = d(st.integers(1, 3)), d(st.integers(1, 3))
    Lq, Lk, D = d(st.integers(1, 40)), d(st.integers(0, 150)), d(st.sampled_from([1, 3, 12, 16, 32, 64]))
    kpm = _mask(d, B, Lk) if d(st.booleans()) else None
    qpm = _mask(d, B, Lq) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in (Lq, Lk, Lk))
    compare_with_reference(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm,
                                                     backend=backend),
                           lambda q, k, v: attention_ref(q, k, v, kpm, qpm), [q, k, v], torch.float32,
                           name=f"{backend} B{B} H{H} Lq{Lq} Lk{Lk} D{D}", noncontig=d(st.booleans()))


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_multi_source(backend, data):
    d = data.draw
    B, H, Lq, D = d(st.integers(1, 2)), d(st.integers(1, 2)), d(st.integers(1, 20)), d(st.sampled_from([4, 12, 16]))
    lens = d(st.lists(st.integers(0, 80), min_size=1, max_size=4))
    masks = [(_mask(d, B, L) if d(st.booleans()) else None) for L in lens]
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    q = torch.randn(B, H, Lq, D, dtype=torch.float64, generator=g)
    kv = [torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in lens for _ in range(2)]
    src = lambda kv: [(kv[2 * i], kv[2 * i + 1], m) for i, m in enumerate(masks)]  # noqa: E731
    compare_with_reference(lambda q, *kv: multi_source_attention(q, src(kv), backend=backend),
                           lambda q, *kv: multi_source_attention_ref(q, src(kv)), [q, *kv], torch.float32,
                           name=f"{backend} lens={lens} D{D}")


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_bottleneck(backend, data):
    d = data.draw
    B, H, K, D = d(st.integers(1, 3)), d(st.integers(1, 2)), d(st.integers(1, 16)), d(st.sampled_from([4, 12, 32]))
    lens = d(st.lists(st.integers(0, 70), min_size=1, max_size=3))
    M = len(lens)
    qpms = [(_mask(d, B, L) if d(st.booleans()) else None) for L in lens]
    kpm = _mask(d, B, K) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    qs = [torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in lens]
    kvs = [torch.randn(B, H, K, D, dtype=torch.float64, generator=g) for _ in range(2 * M)]
    compare_with_reference(lambda *t: bottleneck_exchange(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm, backend=backend),
                           lambda *t: bottleneck_exchange_ref(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm),
                           [*qs, *kvs], torch.float32, name=f"{backend} lens={lens} K{K} D{D}")


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ
@given(data=st.data())
def test_fuzz_masked_mean(backend, data):
    d = data.draw
    B, L, D = d(st.integers(1, 4)), d(st.integers(1, 50)), d(st.integers(1, 40))
    valid = ~_mask(d, B, L)
    x = torch.randn(B, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(d(st.integers(0, 99))))
    compare_with_reference(lambda x: masked_mean(x, valid, backend=backend), lambda x: masked_mean_ref(x, valid),
                           [x], torch.float32, name=f"{backend} {(B, L, D)}")


# ---------------------------------------------------------------------------------------------------------------
# Non-finite inputs: NaN / ±inf in q or k (x for masked_mean) propagate exactly as in the reference.
#
# Forward: the backend output has NaN / +inf / −inf at exactly the reference's positions and matches it elsewhere
# (error rule). Backward, where gradients are defined — the gradient of an input element that does not feed a NaN
# output row (dq of a finite row; dk / dv of a (batch, head) whose output is finite; every masked_mean gradient):
# finite and within the error rule wherever the fp64 reference gradient is finite; and a query row whose output is
# NaN gets a non-finite dq row, as in the reference. (Where a NaN output row is fed, the reference's own gradient is
# an artifact of its NaN guards — e.g. finite exp(s) terms next to a NaN — so nothing is compared there.) Fully
# padded rows still give zeros, never NaN.
NONFINITE_BACKENDS = available_backends(include_triton=True)
FUZZ_NF = settings(max_examples=25, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _inject(draw, t, values=_NONFINITE):
    """Write 1..3 non-finite values at random positions of the float64 tensor t (in place; no-op when empty)."""
    if t.numel() == 0:
        return t
    flat = t.view(-1)
    for _ in range(draw(st.integers(1, 3))):
        flat[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(values))
    return t


def _same_nonfinite(got, ref, name):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    for test, what in ((torch.isnan, "NaN"), (torch.isposinf, "+inf"), (torch.isneginf, "-inf")):
        a, b = test(got), test(ref)
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: {what} at {int((a & ~b).sum())} elements where the reference has none, "
                                 f"missing at {int((b & ~a).sum())} elements where the reference has it")


def _close_where(got, ref64, ref_dt, name, where=None):
    """Error rule on the elements where both references are finite (and ``where``); ``got`` must be finite there."""
    atol = ATOL_FLOOR[got.dtype]
    got, ref64, ref_dt = (t.detach().double().cpu() for t in (got, ref64, ref_dt))
    sel = torch.isfinite(ref64) & torch.isfinite(ref_dt)
    if where is not None:
        sel &= where
    if not torch.isfinite(got[sel]).all():
        raise AssertionError(f"{name}: non-finite at {int((~torch.isfinite(got[sel])).sum())} elements where the "
                             f"reference is finite")
    assert_close_to_reference(got[sel], ref64[sel], ref_dt[sel], name=name, atol=atol)


def _defined(mode, grad, out):
    """Bool mask (grad's shape) of the gradient elements that feed no NaN output: "row" (grad rows ↔ output rows),
    "slice" (per leading (B, H) slice), "all"."""
    if mode == "all":
        return torch.ones(grad.shape, dtype=torch.bool)
    finite = torch.isfinite(out.detach().cpu())
    if mode == "row":
        return finite.all(-1, keepdim=True).expand(grad.shape)
    ok = finite.flatten(2).all(-1) if finite.dim() > 2 else finite.all(-1)
    return ok.view(*ok.shape, *([1] * (grad.dim() - ok.dim()))).expand(grad.shape)


def compare_nonfinite(run, ref, inputs64, name, grad_map, dtype=torch.float32):
    """``compare_with_reference`` for inputs holding NaN / inf (rules above). ``grad_map[i]`` = (output index,
    mode of ``_defined``) for input i."""
    (o64, od, ob), (g64, gd, gb) = forward_backward_triplet(run, ref, inputs64, dtype)
    for i, (a, b, c) in enumerate(zip(ob, o64, od)):
        _same_nonfinite(a, b, f"{name} output[{i}]")
        _close_where(a, b, c, f"{name} output[{i}]")
    for i, (a, b, c) in enumerate(zip(gb, g64, gd)):
        if b is None:
            continue
        if a is None:
            raise AssertionError(f"{name}: backend gives no gradient for input {i}")
        out_i, mode = grad_map[i]
        _close_where(a, b, c, f"{name} grad[{i}]", where=_defined(mode, b, o64[out_i]))
        if mode == "row":  # a NaN output row gets a non-finite gradient row (reference and backend alike)
            nan_rows = torch.isnan(o64[out_i].detach()).any(-1)
            for g, who in ((b, "reference"), (a, "backend")):
                rows = g.detach()[nan_rows]
                if rows.numel() and not (~torch.isfinite(rows)).any(-1).all():
                    raise AssertionError(f"{name}: {who} grad[{i}] is finite on a row whose output is NaN")


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@FUZZ_NF
@given(data=st.data())
def test_fuzz_attention_nonfinite(backend, data):
    d = data.draw
    B, H = d(st.integers(1, 2)), d(st.integers(1, 2))
    Lq, Lk, D = d(st.integers(1, 12)), d(st.integers(0, 20)), d(st.sampled_from([3, 12, 16]))
    kpm = _mask(d, B, Lk) if d(st.booleans()) else None
    qpm = _mask(d, B, Lq) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in (Lq, Lk, Lk))
    for t in d(st.sampled_from([(q,), (k,), (q, k)])):
        _inject(d, t)
    compare_nonfinite(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm,
                                                backend=backend),
                      lambda q, k, v: attention_ref(q, k, v, kpm, qpm), [q, k, v],
                      name=f"{backend} B{B} H{H} Lq{Lq} Lk{Lk} D{D} kpm={kpm is not None} qpm={qpm is not None}",
                      grad_map=[(0, "row"), (0, "slice"), (0, "slice")])


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@FUZZ_NF
@given(data=st.data())
def test_fuzz_multi_source_nonfinite(backend, data):
    d = data.draw
    B, H, Lq, D = d(st.integers(1, 2)), d(st.integers(1, 2)), d(st.integers(1, 10)), d(st.sampled_from([4, 16]))
    lens = d(st.lists(st.integers(0, 20), min_size=1, max_size=3))
    masks = [(_mask(d, B, L) if d(st.booleans()) else None) for L in lens]
    qpm = _mask(d, B, Lq) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    q = torch.randn(B, H, Lq, D, dtype=torch.float64, generator=g)
    kv = [torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in lens for _ in range(2)]
    if d(st.booleans()):
        _inject(d, q)
    _inject(d, kv[2 * d(st.integers(0, len(lens) - 1))])  # a k of some source
    src = lambda kv: [(kv[2 * i], kv[2 * i + 1], m) for i, m in enumerate(masks)]  # noqa: E731
    compare_nonfinite(lambda q, *kv: multi_source_attention(q, src(kv), query_padding_mask=qpm, backend=backend),
                      lambda q, *kv: multi_source_attention_ref(q, src(kv), query_padding_mask=qpm), [q, *kv],
                      name=f"{backend} lens={lens} Lq{Lq} D{D}", grad_map=[(0, "row")] + [(0, "slice")] * len(kv))


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@FUZZ_NF
@given(data=st.data())
def test_fuzz_bottleneck_nonfinite(backend, data):
    d = data.draw
    B, H, K, D = d(st.integers(1, 2)), d(st.integers(1, 2)), d(st.integers(1, 16)), d(st.sampled_from([4, 16]))
    lens = d(st.lists(st.integers(0, 12), min_size=1, max_size=3))
    M = len(lens)
    qpms = [(_mask(d, B, L) if d(st.booleans()) else None) for L in lens]
    kpm = _mask(d, B, K) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    qs = [torch.randn(B, H, L, D, dtype=torch.float64, generator=g) for L in lens]
    kvs = [torch.randn(B, H, K, D, dtype=torch.float64, generator=g) for _ in range(2 * M)]
    m = d(st.integers(0, M - 1))
    for t in d(st.sampled_from([(qs[m],), (kvs[m],), (qs[m], kvs[m])])):
        _inject(d, t)
    compare_nonfinite(lambda *t: bottleneck_exchange(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm, backend=backend),
                      lambda *t: bottleneck_exchange_ref(t[:M], t[M:2 * M], t[2 * M:], qpms, kpm),
                      [*qs, *kvs], name=f"{backend} lens={lens} K{K} D{D}",
                      grad_map=[(i, "row") for i in range(M)] + [(i % M, "slice") for i in range(2 * M)])


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
@FUZZ_NF
@given(data=st.data())
def test_fuzz_masked_mean_nonfinite(backend, data):
    """NaN / inf at a valid position reach the mean (inf + −inf = NaN); padded positions are ignored, and a row
    without a valid position gives zeros whatever its padding holds."""
    d = data.draw
    B, L, D = d(st.integers(1, 4)), d(st.integers(1, 30)), d(st.integers(1, 20))
    valid = ~_mask(d, B, L)
    x = torch.randn(B, L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(d(st.integers(0, 99))))
    _inject(d, x)
    compare_nonfinite(lambda x: masked_mean(x, valid, backend=backend), lambda x: masked_mean_ref(x, valid), [x],
                      name=f"{backend} {(B, L, D)}", grad_map=[(0, "all")])


def test_nonfinite_distinguishes_fully_padded_rows_from_nan_scores():
    """Deterministic core of the fuzz cases above, on every backend: a row whose keys are all padding gives zeros
    even when its query holds NaN; a NaN / +inf score on a valid key gives a NaN row; a NaN in a padded key or a
    padded query row changes nothing; a row whose valid scores are all −inf gives zeros (as the reference)."""
    B, H, Lq, Lk, D = 3, 1, 4, 5, 4
    q = torch.randn(B, H, Lq, D, dtype=torch.float64)
    k = torch.randn(B, H, Lk, D, dtype=torch.float64)
    v = torch.randn(B, H, Lk, D, dtype=torch.float64)
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[0] = True                      # sample 0: every key padded
    kpm[1, 3:] = True                  # sample 1: keys 3, 4 padded
    qpm = torch.zeros(B, Lq, dtype=torch.bool)
    qpm[1, 3] = True
    q[0, 0, 1, 2] = float("nan")       # fully padded sample: still zeros
    q[1, 0, 0, 1] = float("nan")       # valid row with valid keys: NaN row
    q[1, 0, 3, 0] = float("nan")       # padded query row: zeros
    k[1, 0, 4, 0] = float("nan")       # padded key: ignored
    k[2, 0, 2, 3] = float("inf")       # valid key: rows with a +inf (or NaN) score become NaN
    ref = attention_ref(q, k, v, kpm, qpm)
    assert torch.equal(ref[0], torch.zeros_like(ref[0]))
    assert torch.isnan(ref[1, 0, 0]).all() and torch.isfinite(ref[1, 0, 1:]).all()
    for backend in NONFINITE_BACKENDS:
        out = attention(q.float(), k.float(), v.float(), key_padding_mask=kpm, query_padding_mask=qpm,
                        backend=backend)
        _same_nonfinite(out, ref, backend)
        _close_where(out, ref, attention_ref(q.float(), k.float(), v.float(), kpm, qpm), backend)
    # all valid scores −inf: the row is excluded like a fully padded one (zeros, not NaN)
    q2 = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    q2[..., 0] = float("-inf")
    k2 = torch.rand(1, 1, 3, 2, dtype=torch.float64) + 0.5  # positive: every score is −inf
    v2 = torch.randn(1, 1, 3, 2, dtype=torch.float64)
    ref2 = attention_ref(q2, k2, v2)
    assert torch.equal(ref2, torch.zeros_like(ref2))
    for backend in NONFINITE_BACKENDS:
        out = attention(q2.float(), k2.float(), v2.float(), backend=backend)
        assert torch.equal(out, torch.zeros_like(out)), backend


@pytest.mark.parametrize("backend", NONFINITE_BACKENDS)
def test_key_excluded_by_a_minus_inf_score_keeps_gradients_finite(backend):
    """An inf in a valid key whose score is −inf for every query row excludes that key (finite outputs); the
    gradients of k / v and of the other keys stay finite and match (Triton: also the rows past Lq in a tile)."""
    B, H, Lq, Lk, D = 2, 1, 3, 4, 8
    q = torch.rand(B, H, Lq, D, dtype=torch.float64) + 0.5   # positive: q · (−inf e_0) = −inf
    k = torch.randn(B, H, Lk, D, dtype=torch.float64)
    v = torch.randn(B, H, Lk, D, dtype=torch.float64)
    k[0, 0, 2, 0] = float("-inf")
    kpm = torch.zeros(B, Lk, dtype=torch.bool)
    kpm[1, 3] = True
    compare_nonfinite(lambda q, k, v: attention(q, k, v, key_padding_mask=kpm, backend=backend),
                      lambda q, k, v: attention_ref(q, k, v, kpm), [q, k, v], name=backend,
                      grad_map=[(0, "row"), (0, "slice"), (0, "slice")])
    qs, ks, vs = [q[:, :, :2], q], [k, k], [v, v]
    compare_nonfinite(lambda *t: bottleneck_exchange(t[:2], t[2:4], t[4:], None, kpm, backend=backend),
                      lambda *t: bottleneck_exchange_ref(t[:2], t[2:4], t[4:], None, kpm), [*qs, *ks, *vs],
                      name=f"{backend} bottleneck",
                      grad_map=[(0, "row"), (1, "row"), (0, "slice"), (1, "slice"), (0, "slice"), (1, "slice")])


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_auto_inference_route_nonfinite(data):
    """backend="auto" on CPU may route inference calls to torch SDPA (msa_fast.ops.attention): NaN there follows
    the reference too (padded keys ignored, fully padded rows zero). Only NaN is injected: SDPA adds its mask to the
    scores, so an inf query element whose valid scores are all −inf would give NaN instead of the reference's zeros
    (documented in msa_fast.ops.multi_source_attention.run_sdpa)."""
    d = data.draw
    B, H, Lq, Lk, D = d(st.integers(1, 2)), 1, d(st.integers(1, 8)), d(st.integers(1, 12)), 16
    kpm = _mask(d, B, Lk)
    qpm = _mask(d, B, Lq) if d(st.booleans()) else None
    g = torch.Generator().manual_seed(d(st.integers(0, 2**31)))
    q, k, v = (torch.randn(B, H, L, D, generator=g) for L in (Lq, Lk, Lk))
    for t in d(st.sampled_from([(q,), (k,), (q, k)])):
        _inject(d, t, values=(float("nan"),))
    with torch.no_grad():
        out = attention(q, k, v, key_padding_mask=kpm, query_padding_mask=qpm)
        out_ms = multi_source_attention(q, [(k, v, kpm), (k, v, None)], query_padding_mask=qpm)
    ref = attention_ref(q.double(), k.double(), v.double(), kpm, qpm)
    ref_ms = multi_source_attention_ref(q.double(), [(k.double(), v.double(), kpm), (k.double(), v.double(), None)],
                                        query_padding_mask=qpm)
    _same_nonfinite(out, ref, "auto attention")
    _same_nonfinite(out_ms, ref_ms, "auto multi_source_attention")
