"""MemoryBank: retrieval vs a per-query fp64 loop, availability, EMA, fallback, non-transductive eval, IVF refresh."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msa_fast.retrieval import MemoryBank, faiss_or_none


def _bank_data(n: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, d, generator=g)
    x = centers[torch.randint(0, 6, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    avail = torch.rand(n, generator=g) > 0.25
    return x, avail


def _loop_reference(bank_x, avail, q, k, threshold, weighting, exclude, temperature=0.1):
    """Per query: cosine to every available row (minus the excluded id), top-k, threshold, aggregate (fp64)."""
    bx, qq = F.normalize(bank_x.double(), dim=1), F.normalize(q.double(), dim=1)
    nonzero = avail & (bank_x.sum(1) != 0)
    fallback = bank_x.double()[nonzero].mean(0)
    out = []
    for i in range(q.shape[0]):
        cand = avail.clone()
        if exclude is not None and exclude[i] >= 0:
            cand[exclude[i]] = False
        ids = cand.nonzero().flatten()
        sims = qq[i] @ bx[ids].T
        top, pos = sims.topk(min(k, len(ids)))
        keep = top >= threshold if threshold is not None else torch.ones_like(top, dtype=torch.bool)
        if not keep.any():
            out.append(fallback)
            continue
        sel, s = ids[pos[keep]], top[keep]
        if weighting == "mean":
            w = torch.ones_like(s)
        elif weighting == "similarity":
            w = s.clamp_min(0)
        else:
            w = torch.softmax(s / temperature, 0)
        out.append((w[:, None] * bank_x.double()[sel]).sum(0) / w.sum())
    return torch.stack(out)


@pytest.mark.parametrize("weighting", ["mean", "similarity", "softmax"])
@pytest.mark.parametrize("threshold", [None, 0.6])
def test_retrieve_matches_loop(weighting, threshold):
    n, d = 300, 16
    x, avail = _bank_data(n, d, 0)
    bank = MemoryBank(n, d, modalities=("a",), index_kwargs={"backend": "torch"})
    for s in range(0, n, 64):  # written batch by batch, as in training
        ids = torch.arange(s, min(s + 64, n))
        bank.update("a", ids, x[ids], avail[ids])
    q_ids = torch.tensor([0, 5, 17, 250, 299])
    q = x[q_ids] + 0.1 * torch.randn(5, d)
    q[-1] = -x[0] * 3  # far from everything → fallback under the threshold
    exclude = torch.tensor([0, 5, -1, 250, -1])
    r, info = bank.retrieve("a", q, k=8, threshold=threshold, weighting=weighting, exclude_ids=exclude)
    ref = _loop_reference(x, avail, q, 8, threshold, weighting, exclude)
    torch.testing.assert_close(r.double(), ref, rtol=1e-4, atol=1e-5)
    assert not torch.isin(info["ids"][info["valid"]], (~avail).nonzero().flatten()).any()  # missing never retrieved
    assert (info["ids"][[0, 1, 3]] != exclude[[0, 1, 3]][:, None]).all()


def test_ema_and_availability_updates():
    bank = MemoryBank(4, 3, modalities=("l",), momentum=0.9, index_kwargs={"backend": "torch"})
    ids = torch.tensor([0, 1, 2])
    v1, v2 = torch.ones(3, 3), torch.full((3, 3), 3.0)
    bank.update("l", ids, v1, torch.tensor([True, True, False]))
    bank.update("l", ids, v2, torch.tensor([True, False, True]))
    torch.testing.assert_close(bank.storage["l"][0], torch.full((3,), 0.9 * 1 + 0.1 * 3))  # EMA
    torch.testing.assert_close(bank.storage["l"][2], torch.full((3,), 3.0))  # first write overwrites
    assert bank.available["l"].tolist() == [True, False, True, False]
    over = MemoryBank(4, 3, modalities=("l",))
    over.update("l", ids, v1)
    over.update("l", ids, v2)
    torch.testing.assert_close(over.storage["l"][:3], v2)


def test_eval_is_not_transductive_and_no_nan_for_missing_queries():
    n, d = 200, 8
    x, avail = _bank_data(n, d, 1)
    bank = MemoryBank(n, {"l": d, "v": d}, modalities=("l", "v"))
    bank.update("l", torch.arange(n), x, avail)
    test_a, test_b = torch.randn(10, d), torch.randn(30, d)
    ra, _ = bank.retrieve("l", test_a, k=5, threshold=0.5)
    rab, _ = bank.retrieve("l", torch.cat([test_a, test_b]), k=5, threshold=0.5)
    torch.testing.assert_close(ra, rab[:10])  # a test prediction does not depend on the other test samples
    zero_q = torch.zeros(3, d)  # a missing query modality (zeros): cosine 0 → fallback, finite
    rz, info = bank.retrieve("l", zero_q, k=5, threshold=0.5)
    assert info["fallback"].all() and torch.isfinite(rz).all()
    torch.testing.assert_close(rz[0], x[avail].mean(0))


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_k_none_takes_every_available_row_above_the_threshold(threshold):
    """k=None (HME's evaluation bank): all available rows pass to the threshold, none cut off by a top-k."""
    n, d = 300, 16
    x, avail = _bank_data(n, d, 3)
    bank = MemoryBank(n, d, modalities=("a",), index_kwargs={"backend": "torch"})
    bank.update("a", torch.arange(n), x, avail)
    q = x[torch.tensor([1, 2, 150, 299])] + 0.1 * torch.randn(4, d)
    q[-1] = 0.0  # cosine 0 to everything → fallback under the threshold
    r, info = bank.retrieve("a", q, k=None, threshold=threshold)
    n_avail = int(avail.sum())
    torch.testing.assert_close(r.double(), _loop_reference(x, avail, q, n_avail, threshold, "mean", None),
                               rtol=1e-4, atol=1e-5)
    assert info["ids"].shape == (4, n_avail) and not torch.isin(info["ids"][info["valid"]],
                                                                 (~avail).nonzero().flatten()).any()
    if threshold is not None:
        assert info["valid"].sum(1)[:3].min() > 8  # more neighbours than any fixed small k would keep
        assert info["fallback"].tolist() == [False, False, False, True]


def test_fallback_mask_forces_the_fallback_mean():
    n, d = 50, 8
    x, avail = _bank_data(n, d, 4)
    bank = MemoryBank(n, d, modalities=("v",))
    bank.update("v", torch.arange(n), x, avail)
    q = x[:3].clone()
    force = torch.tensor([False, True, False])
    r, info = bank.retrieve("v", q, k=None, threshold=0.5, fallback_mask=force)
    plain, _ = bank.retrieve("v", q, k=None, threshold=0.5)
    assert info["fallback"][1] and not info["fallback"][[0, 2]].any()
    torch.testing.assert_close(r[1], x[avail & (x.sum(1) != 0)].mean(0))
    torch.testing.assert_close(r[[0, 2]], plain[[0, 2]])
    with pytest.raises(ValueError, match="fallback_mask"):
        bank.retrieve("v", q, k=None, fallback_mask=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be a positive int or None"):
        bank.retrieve("v", q, k=0)


@pytest.mark.skipif(faiss_or_none() is None, reason="faiss not installed")
def test_ivf_bank_refresh_keeps_quantizer():
    n, d = 3000, 16
    x, avail = _bank_data(n, d, 2)
    bank = MemoryBank(n, d, modalities=("v",), kind="ivf_flat", index_kwargs={"nlist": 16, "nprobe": 16})
    bank.update("v", torch.arange(n), x, avail)
    bank.refresh()
    ivf = bank.indexes["v"]._shards[0].ivf
    cents = ivf.quantizer.reconstruct_n(0, 16).copy()
    bank.update("v", torch.arange(100), x[:100] * 2)
    r_stale, _ = bank.retrieve("v", x[:4], k=5)  # no auto refresh for IVF: selection from the last refresh
    bank.refresh()
    assert bank.indexes["v"]._shards[0].ivf is ivf and (ivf.quantizer.reconstruct_n(0, 16) == cents).all()
    assert len(bank.indexes["v"]) == int(bank.available["v"].sum()) == int((avail | (torch.arange(n) < 100)).sum())
    r, info = bank.retrieve("v", x[:4], k=5, exclude_ids=torch.arange(4))
    ref = _loop_reference(bank.storage["v"], bank.available["v"], x[:4], 5, None, "mean", torch.arange(4))
    torch.testing.assert_close(r.double(), ref, rtol=1e-4, atol=1e-5)  # nprobe = nlist: exact


def test_bad_input():
    bank = MemoryBank(10, 4, modalities=("a",))
    with pytest.raises(ValueError, match="empty"):
        bank.retrieve("a", torch.randn(2, 4), k=1)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 10\)"):
        bank.update("a", torch.tensor([3, 10]), torch.randn(2, 4))
    with pytest.raises(ValueError, match="shape"):
        bank.update("a", torch.tensor([1]), torch.randn(1, 5))
    with pytest.raises(ValueError, match="NaN or inf"):
        bank.update("a", torch.tensor([1]), torch.tensor([[0.0, float("nan"), 1.0, 2.0]]))
    with pytest.raises(ValueError, match="unknown modality"):
        bank.update("t", torch.tensor([1]), torch.randn(1, 4))
    bank.update("a", torch.arange(5), torch.randn(5, 4))
    with pytest.raises(ValueError, match="exceeds"):
        bank.retrieve("a", torch.randn(2, 4), k=6)
    with pytest.raises(ValueError, match="weighting"):
        bank.retrieve("a", torch.randn(2, 4), k=2, weighting="max")
    with pytest.raises(ValueError, match="momentum"):
        MemoryBank(10, 4, momentum=1.5)


@pytest.mark.parametrize("temperature", [0, 0.0, -0.1, float("nan"), float("inf"), float("-inf"), "0.1", None, True])
def test_temperature_must_be_a_positive_finite_number(temperature):
    """τ = 0 used to divide the scores by zero (NaN softmax weights, zeroed into all-zero vectors): refused."""
    bank = MemoryBank(10, 4, modalities=("a",), index_kwargs={"backend": "torch"})
    bank.update("a", torch.arange(10), torch.randn(10, 4))
    for weighting in ("softmax", "mean"):
        with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
            bank.retrieve("a", torch.randn(3, 4), k=4, weighting=weighting, temperature=temperature)


def test_small_positive_temperature_is_accepted_and_not_zero():
    bank = MemoryBank(10, 4, modalities=("a",), index_kwargs={"backend": "torch"})
    x = torch.randn(10, 4)
    bank.update("a", torch.arange(10), x)
    r, info = bank.retrieve("a", x[:3], k=4, weighting="softmax", temperature=1e-3)
    assert torch.isfinite(r).all() and (r.abs().sum(1) > 0).all()
    # a tiny τ approaches the arg-max neighbour (the query's own row here)
    torch.testing.assert_close(r, x[:3], rtol=1e-3, atol=1e-3)
