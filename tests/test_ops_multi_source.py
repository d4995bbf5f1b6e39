"""msa_fast.ops.multi_source_attention: one softmax per source, summed, vs the fp64 reference on every backend."""
import pytest
import torch

from msa_fast.ops import multi_source_attention
from msa_fast.testing import available_backends, compare_with_reference, random_padding_mask
from msa_fast.testing.reference import multi_source_attention_ref

BACKENDS = available_backends()


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not available here (cpp: extension not built; triton: not importable)")


# (B, H, Lq, source lengths, D) — includes an empty source, a 1-key source and MOSI-like lengths
CASES = [(2, 2, 9, (5, 0, 13), 12), (2, 2, 50, (50, 376, 501), 16), (3, 1, 17, (1, 70), 32), (1, 2, 8, (40,), 64)]
TRITON_CASES = [(2, 2, 9, (5, 0, 13), 12), (1, 2, 12, (20, 7), 32)]


def _build(B, H, Lq, lens, D, device="cpu"):
    q = torch.randn(B, H, Lq, D, dtype=torch.float64, device=device)
    kv, masks = [], []
    for i, L in enumerate(lens):
        kv += [torch.randn(B, H, L, D, dtype=torch.float64, device=device) for _ in range(2)]
        masks.append(None if i == 1 else random_padding_mask(B, L, empty_row=(i == 0)).to(device))
    qpm = random_padding_mask(B, Lq, empty_row=False).to(device)
    return q, kv, masks, qpm


def _sources(kv, masks):
    return [(kv[2 * i], kv[2 * i + 1], m) for i, m in enumerate(masks)]


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("noncontig", [False, True])
def test_multi_source_matches_reference(backend, noncontig):
    _need(backend)
    dev = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    for B, H, Lq, lens, D in (TRITON_CASES if backend == "triton" else CASES):
        q, kv, masks, qpm = _build(B, H, Lq, lens, D, dev)
        compare_with_reference(
            lambda q, *kv: multi_source_attention(q, _sources(kv, masks), query_padding_mask=qpm, backend=backend),
            lambda q, *kv: multi_source_attention_ref(q, _sources(kv, masks), query_padding_mask=qpm),
            [q, *kv], torch.float32, name=f"{backend} {lens} D={D}", noncontig=noncontig)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_multi_source_gradcheck_fp64(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} not available")
    q, kv, masks, qpm = _build(2, 1, 3, (3, 0, 66), 2)
    leaves = [t.requires_grad_(True) for t in (q, *kv)]
    assert torch.autograd.gradcheck(
        lambda q, *kv: multi_source_attention(q, _sources(kv, masks), query_padding_mask=qpm, backend=backend), leaves)


def test_single_source_equals_attention():
    from msa_fast.ops import attention
    q, k, v = (torch.randn(2, 2, L, 8) for L in (3, 6, 6))
    m = random_padding_mask(2, 6)
    torch.testing.assert_close(multi_source_attention(q, [(k, v, m)]), attention(q, k, v, key_padding_mask=m))


@pytest.mark.parametrize("bad, exc, match", [
    ("empty", ValueError, "non-empty"),
    ("pair", ValueError, r"sources\[0\] must be"),
    ("heads", ValueError, r"sources\[1\] k must be"),
    ("mask", ValueError, r"sources\[1\] key_padding_mask must have shape"),
    ("dtype", TypeError, r"sources\[0\] v has dtype"),
])
def test_bad_sources_are_named(bad, exc, match):
    q = torch.randn(2, 2, 4, 8)
    s0 = (torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), None)
    s1 = (torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8), torch.zeros(2, 3, dtype=torch.bool))
    sources = {"empty": [], "pair": [s0[:2], s1], "heads": [s0, (torch.randn(2, 3, 3, 8),) * 2 + (None,)],
               "mask": [s0, (s1[0], s1[1], torch.zeros(2, 4, dtype=torch.bool))],
               "dtype": [(s0[0], s0[1].double(), None), s1]}[bad]
    with pytest.raises(exc, match=match):
        multi_source_attention(q, sources)


def test_auto_route_matches_reference():
    """backend="auto" (C++ kernel, or per-source SDPA where measured faster) incl. an empty source and masks."""
    q, kv, masks, qpm = _build(3, 2, 9, (5, 0, 70), 16)
    compare_with_reference(lambda q, *kv: multi_source_attention(q, _sources(kv, masks), query_padding_mask=qpm),
                           lambda q, *kv: multi_source_attention_ref(q, _sources(kv, masks), query_padding_mask=qpm),
                           [q, *kv], torch.float32, name="auto")


def test_auto_inference_route_matches_reference():
    from msa_fast.testing import assert_close_to_reference
    q, kv, masks, qpm = _build(3, 2, 9, (5, 0, 70), 16)
    with torch.no_grad():
        out = multi_source_attention(q.float(), _sources([t.float() for t in kv], masks), query_padding_mask=qpm)
    ref = multi_source_attention_ref(q, _sources(kv, masks), query_padding_mask=qpm)
    ref32 = multi_source_attention_ref(q.float(), _sources([t.float() for t in kv], masks), query_padding_mask=qpm)
    assert_close_to_reference(out, ref, ref32, name="auto no_grad")


def test_auto_routes_to_sdpa_where_it_measured_faster():
    """The measured routing table of ``auto`` on CPU (msa_fast.ops.multi_source_attention): several sources at
    D >= 64 in every mode, unmasked or inference calls at D < 12 over >= 256 keys; D 12 / 16 (the C++ kernel's vector
    loops), masked D 32 / single-source D 64 training and short key sets at D < 12 stay on the C++ kernel."""
    from msa_fast.ops.multi_source_attention import SDPA_SMALL_HEAD_DIM_MIN_KEYS, sdpa_route_applies

    def tensors(d, grad, keys=SDPA_SMALL_HEAD_DIM_MIN_KEYS):
        q = torch.randn(2, 2, 8, d, requires_grad=grad)
        return q, [q, torch.randn(2, 2, 12, d), torch.randn(2, 2, 12, d), torch.randn(2, 2, keys, d),
                   torch.randn(2, 2, keys, d)]

    q, ts = tensors(64, True)
    assert sdpa_route_applies("auto", "cpp", q, ts, n_sources=2)
    assert not sdpa_route_applies("auto", "cpp", q, ts, n_sources=1)
    assert not sdpa_route_applies("cpp", "cpp", q, ts, n_sources=2)  # a forced backend is never rerouted
    q, ts = tensors(8, True)
    assert sdpa_route_applies("auto", "cpp", q, ts, unmasked=True, n_sources=2)
    assert not sdpa_route_applies("auto", "cpp", q, ts, unmasked=False, n_sources=2)
    with torch.no_grad():
        assert sdpa_route_applies("auto", "cpp", q, ts, n_sources=2)
    for d in (12, 16):  # the C++ kernel's vector loops: measured equal or faster than SDPA
        q, ts = tensors(d, True)
        assert not sdpa_route_applies("auto", "cpp", q, ts, unmasked=True, n_sources=2)
        with torch.no_grad():
            assert not sdpa_route_applies("auto", "cpp", q, ts, n_sources=1)
    q, ts = tensors(8, True, keys=SDPA_SMALL_HEAD_DIM_MIN_KEYS - 1)  # short key sets: the C++ kernel measured faster
    assert not sdpa_route_applies("auto", "cpp", q, ts, unmasked=True, n_sources=2)
    with torch.no_grad():
        assert not sdpa_route_applies("auto", "cpp", q, ts, n_sources=2)
    q, ts = tensors(32, True)
    assert not sdpa_route_applies("auto", "cpp", q, ts, unmasked=True, n_sources=2)
