"""DashFusion partner retrieval vs a plain loop of the official ``__pre_sample`` (fp64 full ranking)."""
from __future__ import annotations

import pytest
import torch

from msa_fast.retrieval import label_aware_partners, official_partner_loop

WINDOWS = [(1.0, 1.0), (1 / 2, 1 / 8), (1 / 1.6, 1 / 2), (0.2, 0.05)]  # MOSI, MOSEI, SIMS, tight (windows bind)


def _data(n: int, f: int, seed: int, classes: int = 7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=torch.float64)
    y = torch.round(torch.randn(n, generator=g).clamp(-3, 3) * 1.2)  # rounded MOSI-like labels, rare extremes
    return x, y.clamp(-(classes // 2), classes // 2)


@pytest.mark.parametrize("bug", [False, True])
@pytest.mark.parametrize("windows", WINDOWS)
@pytest.mark.parametrize("n,block", [(260, 64), (97, 1000)])
def test_matches_official_loop(bug, windows, n, block):
    x, y = _data(n, 12, n)
    fast = label_aware_partners(x, y, k=10, rank_index_bug=bug, window_top=windows[0], window_bottom=windows[1],
                                block=block)
    ref = official_partner_loop(x, y, k=10, rank_index_bug=bug, window_top=windows[0], window_bottom=windows[1])
    for kind in ("ss", "sd", "dd"):
        assert fast[kind].dtype == torch.long and fast[kind].shape == (n, 10)
        assert torch.equal(fast[kind], ref[kind]), (kind, bug, windows)


def test_small_classes_pad_and_semantics():
    x, _ = _data(60, 8, 5)
    y = torch.zeros(60)
    y[:3] = 1.0  # a class of 3: ss holds 2 (self excluded), rest −1
    y[3:8] = 2.0
    pools = label_aware_partners(x.float(), y, k=4)
    assert (pools["ss"][:3, :2] >= 0).all() and (pools["ss"][:3, 2:] == -1).all()
    for i in range(3):
        assert set(pools["ss"][i, :2].tolist()) == {0, 1, 2} - {i}
    assert (y[pools["sd"][10]] != y[10]).all() and (y[pools["dd"][10]] != y[10]).all()
    assert not (pools["ss"] == torch.arange(60)[:, None]).any()  # self excluded by id
    ref = official_partner_loop(x, y, k=4)
    for kind in ("ss", "sd", "dd"):
        assert torch.equal(pools[kind], ref[kind])
    bug = label_aware_partners(x.float(), y, k=4, rank_index_bug=True)
    assert bug["ss"][bug["ss"] >= 0].max() < 60 and bug["dd"][bug["dd"] >= 0].min() > 0  # positions, not ids


def test_bad_input():
    x, y = _data(20, 4, 0)
    with pytest.raises(ValueError, match="labels"):
        label_aware_partners(x, y[:5])
    with pytest.raises(ValueError, match="NaN or inf"):
        label_aware_partners(torch.full((3, 2), float("nan")), torch.zeros(3))
    with pytest.raises(ValueError, match="labels contain NaN"):
        label_aware_partners(x, torch.full((20,), float("nan")))
    with pytest.raises(ValueError, match="window_top"):
        label_aware_partners(x, y, window_top=0.0)
    with pytest.raises(ValueError, match="k must"):
        label_aware_partners(x, y, k=0)
    with pytest.raises(ValueError, match="non-empty"):
        label_aware_partners(torch.zeros(0, 4), torch.zeros(0))


@pytest.mark.parametrize("k, largest, bounds", [
    (7, True, [0, 300]), (64, False, [0, 40, 90, 2000]), (700, True, [5, 1900]), (20, True, [10, 12, 50, 51]),
    (300, False, [0, 2000]),
])
def test_cpp_row_topk_equals_torch_topk(k, largest, bounds):
    """The C++ selection (sampled threshold + exact fallback) vs torch.topk on distinct values; short rows padded."""
    from msa_fast import _ext

    lib = _ext.cpp_extension()
    if lib is None or not hasattr(lib, "row_topk"):
        pytest.skip("msa_fast._C (row_topk) not built")
    g = torch.Generator().manual_seed(k)
    s = torch.stack([torch.randperm(2000, generator=g).float() / 7 for _ in range(33)])  # distinct per row
    s[3] = -s[3]
    vals, idx = lib.row_topk(s, bounds, k, largest)
    cols = torch.cat([torch.arange(a, e) for a, e in zip(bounds[::2], bounds[1::2])])
    kk = min(k, len(cols))
    rv, ri = s[:, cols].topk(kk, dim=1, largest=largest)
    assert torch.equal(vals[:, :kk], rv) and torch.equal(idx[:, :kk], cols[ri])
    assert (idx[:, kk:] == -1).all() and torch.isinf(vals[:, kk:]).all()
    with pytest.raises(RuntimeError, match="bounds out of range"):
        lib.row_topk(s, [0, 2001], k, largest)
