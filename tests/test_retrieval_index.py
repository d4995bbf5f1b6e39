"""msa_fast.retrieval.Index: exact search vs an fp64 brute-force reference, ids, IVF, persistence, shards, errors."""
from __future__ import annotations

import errno
import os

import pytest
import torch
import torch.nn.functional as F

import msa_fast.retrieval.index as index_mod
from msa_fast.retrieval import Index, faiss_or_none

HAS_FAISS = faiss_or_none() is not None
needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")


def _clustered(n: int, d: int, seed: int, clusters: int = 20, noise: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, d, generator=g)
    return centers[torch.randint(0, clusters, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)


def _reference(q: torch.Tensor, x: torch.Tensor, k: int, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    q, x = q.double(), x.double()
    if metric == "cosine":
        q, x = F.normalize(q, dim=1), F.normalize(x, dim=1)
    if metric == "l2":
        return torch.cdist(q, x).pow(2).topk(k, dim=1, largest=False)
    return (q @ x.T).topk(k, dim=1)


ENGINES = ["torch"] + (["faiss"] if HAS_FAISS else [])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_exact_search_matches_reference(engine, metric):
    x = torch.randn(700, 24)
    q = torch.randn(33, 24)[:, ::1]
    idx = Index(24, metric=metric, exact_engine=engine, backend="torch" if engine == "torch" else "auto")
    ids = idx.add(x[:400])
    idx.add(x[400:], torch.arange(1000, 1300))
    all_ids = torch.cat([ids, torch.arange(1000, 1300)])
    for k in (1, 10, 700):
        s, i = idx.search(q, k)
        rs, ri = _reference(q, x, k, metric)
        torch.testing.assert_close(s.double(), rs, rtol=1e-4, atol=1e-4)
        assert torch.equal(i, all_ids[ri]), (metric, k)


def test_torch_tiles_merge(monkeypatch):
    """Small score budget → many database chunks, merged top-k equals one shot; non-contiguous queries."""
    monkeypatch.setattr(index_mod, "_SCORE_BUDGET", 64)
    x = torch.randn(500, 16)
    q = torch.randn(16, 40)[:, :16].T.contiguous().T[:7]  # odd strides
    idx = Index(16, metric="ip", backend="torch")
    idx.add(x)
    s, i = idx.search(q, 25)
    rs, ri = _reference(q, x, 25, "ip")
    assert torch.equal(i, ri)
    torch.testing.assert_close(s.double(), rs, rtol=1e-5, atol=1e-5)


def test_k_beyond_gpu_limit_and_self_exclusion_by_id():
    x = torch.randn(2600, 8)
    x[7] = x[3]  # duplicate: self can sit in either slot
    idx = Index(8, metric="cosine", backend="torch")
    ids = idx.add(x, torch.arange(2600) * 2)
    s, i = idx.search(x[[3, 7, 10]], 2100, exclude_ids=ids[[3, 7, 10]])
    assert i.shape == (3, 2100)
    assert not (i == ids[[3, 7, 10]][:, None]).any()
    assert i[0, 0] == ids[7] and i[1, 0] == ids[3]  # the duplicate stays, only the own id is dropped
    assert (s[:, :-1] >= s[:, 1:]).all()
    s, i = idx.search(x[:2], 2600, exclude_ids=ids[:2])  # k = N with an exclusion: last slot padded
    assert (i[:, -1] == -1).all() and torch.isinf(s[:, -1]).all() and (i[:, :-1] >= 0).all()


def test_add_remove_update_by_id():
    x = torch.randn(50, 12)
    idx = Index(12, metric="l2", devices=["cpu", "cpu", "cpu"], backend="torch")  # 3 shards
    idx.add(x, torch.arange(100, 150))
    idx.remove(torch.tensor([100, 120]))
    new = torch.randn(2, 12)
    idx.update(torch.tensor([101, 149]), new)
    assert len(idx) == 48
    s, i = idx.search(new, 1)
    assert i.flatten().tolist() == [101, 149] and torch.allclose(s, torch.zeros(2, 1), atol=1e-4)
    s, i = idx.search(x[[0, 20]], 1)
    assert not torch.isin(i, torch.tensor([100, 120])).any()
    got = idx.add(torch.randn(3, 12))
    assert got.tolist() == [150, 151, 152]
    with pytest.raises(ValueError, match="already present"):
        idx.add(torch.randn(1, 12), torch.tensor([101]))
    with pytest.raises(KeyError, match="not in the index"):
        idx.remove(torch.tensor([100]))
    with pytest.raises(ValueError, match="duplicates"):
        idx.add(torch.randn(2, 12), torch.tensor([7, 7]))
    with pytest.raises(ValueError, match=">= 0"):
        idx.add(torch.randn(1, 12), torch.tensor([-3]))


def test_sharded_equals_single():
    x, q = _clustered(900, 16, 1), torch.randn(20, 16)
    one = Index(16, metric="cosine", backend="torch")
    many = Index(16, metric="cosine", devices=["cpu", "cpu"], backend="torch")
    one.add(x)
    many.add(x)
    ex = torch.arange(20)
    assert torch.equal(one.search(q, 17, exclude_ids=ex)[1], many.search(q, 17, exclude_ids=ex)[1])


@needs_faiss
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_ivf_recall_and_refresh_without_retraining(metric):
    x = _clustered(4000, 32, 2, clusters=40, noise=0.2)
    q = x[:64] + 0.05 * torch.randn(64, 32)
    exact = Index(32, metric=metric, backend="torch")
    exact.add(x)
    ivf = Index(32, metric=metric, kind="ivf_flat", nlist=32, nprobe=8)
    ivf.add(x)
    _, ie = exact.search(q, 10)
    _, ia = ivf.search(q, 10)  # trains on first search
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ie, ia)) / ie.numel()
    assert recall >= 0.95
    centroids = ivf._shards[0].ivf.quantizer.reconstruct_n(0, 32).copy()
    ivf.reset()
    assert ivf.is_trained and len(ivf) == 0
    x2 = x + 0.01 * torch.randn_like(x)
    ivf.add(x2)  # epoch refresh: re-add, no re-training
    assert (ivf._shards[0].ivf.quantizer.reconstruct_n(0, 32) == centroids).all()
    _, ib = ivf.search(q, 10)
    assert (ib >= 0).all()
    _, iexact = ivf.search(q, 10, exact=True)
    exact.reset()
    exact.add(x2)
    assert torch.equal(iexact, exact.search(q, 10)[1])


@needs_faiss
def test_ivf_pq_and_id_ops():
    x = _clustered(12000, 32, 3, clusters=30)
    idx = Index(32, metric="l2", kind="ivf_pq", nlist=16, nprobe=16, pq_m=8)
    ids = idx.add(x)
    idx.train()
    idx.remove(ids[:100])
    s, i = idx.search(x[:5], 5, exclude_ids=ids[:5])
    assert (i >= 100).all() and torch.isfinite(s).all()
    idx.update(ids[200:202], x[:2])
    _, i = idx.search(x[:2], 1)
    assert i.flatten().tolist() == ids[200:202].tolist()


@pytest.mark.parametrize("kind", ["flat"] + (["ivf_flat"] if HAS_FAISS else []))
def test_save_load_roundtrip(tmp_path, kind):
    x = _clustered(2000, 16, 4)
    idx = Index(16, metric="cosine", kind=kind, nlist=16 if kind != "flat" else None, nprobe=4)
    idx.add(x, torch.arange(2000) + 5)
    q = torch.randn(9, 16)
    before = idx.search(q, 7)
    path = tmp_path / "idx.pt"
    idx.save(str(path))
    torch.load(str(path), weights_only=True)  # plain tensors / primitives only
    loaded = Index.load(str(path))
    after = loaded.search(q, 7)
    assert torch.equal(before[1], after[1])
    torch.testing.assert_close(before[0], after[0])
    assert loaded.add(torch.randn(1, 16)).tolist() == [2005]


def _small_index() -> Index:
    idx = Index(8, metric="ip", kind="flat", backend="torch")
    idx.add(torch.randn(20, 8))
    return idx


def test_save_into_an_unusable_path_names_it(tmp_path):
    """Runs as root too (where chmod does not deny writes): a parent that is a regular file, a missing parent and a
    directory as target each raise the errno's OSError subclass with a message naming the path and the reason."""
    idx = _small_index()
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    target = afile / "idx.pt"
    with pytest.raises(NotADirectoryError, match=r"cannot save the index to '.*afile/idx\.pt'.*'.*afile' is a file"):
        idx.save(str(target))
    target = tmp_path / "missing" / "sub" / "idx.pt"
    with pytest.raises(FileNotFoundError, match=r"cannot save the index to '.*missing/sub/idx\.pt'.*does not exist"):
        idx.save(target)  # os.PathLike accepted
    with pytest.raises(IsADirectoryError, match=r"cannot save the index to '.*'.*is a directory"):
        idx.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing left behind


def test_save_into_a_read_only_folder_names_it(tmp_path, monkeypatch):
    """Read-only folder, simulated (root may write anywhere): creating the temporary file fails with EACCES."""
    idx = _small_index()
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def deny(path, *args, **kwargs):
        if os.path.dirname(os.fspath(path)) == str(ro):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(index_mod.os, "open", deny)
    with pytest.raises(PermissionError, match=r"cannot save the index to '.*ro/idx\.pt'.*folder '.*ro' is not "
                                              r"writable"):
        idx.save(str(ro / "idx.pt"))
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_into_a_chmod_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"cannot save the index to '.*ro/idx\.pt'.*not writable"):
            _small_index().save(str(ro / "idx.pt"))
    finally:
        ro.chmod(0o755)


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that fails while writing keeps the previous file intact and removes its temporary file."""
    path = tmp_path / "idx.pt"
    first = _small_index()
    first.save(str(path))
    assert [p.name for p in tmp_path.iterdir()] == ["idx.pt"]  # no temporary file left
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_mod.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"cannot save the index to '.*idx\.pt'.*no space left"):
        _small_index().save(str(path))
    monkeypatch.setattr(index_mod.torch, "save", real_save)
    assert [p.name for p in tmp_path.iterdir()] == ["idx.pt"]
    loaded = Index.load(str(path))
    q = torch.randn(3, 8)
    assert torch.equal(loaded.search(q, 5)[1], first.search(q, 5)[1])


def test_torch_fallback_without_faiss(monkeypatch):
    monkeypatch.setattr(index_mod, "faiss_or_none", lambda: None)
    monkeypatch.setattr(index_mod, "_WARNED", set())
    with pytest.warns(UserWarning, match="needs faiss"):
        idx = Index(8, kind="ivf_flat")
    assert not idx.approximate and idx.backend == "torch"
    x = torch.randn(100, 8)
    idx.add(x)
    _, i = idx.search(x[:4], 3)
    assert torch.equal(i, _reference(x[:4], x, 3, "cosine")[1])
    with pytest.raises(ValueError, match="not installed"):
        Index(8, backend="faiss")


def test_bad_input():
    idx = Index(8, backend="torch")
    with pytest.raises(ValueError, match="empty"):
        idx.search(torch.randn(2, 8), 1)
    with pytest.raises(ValueError, match=r"shape \(n, 8\)"):
        idx.add(torch.randn(3, 9))
    bad = torch.randn(3, 8)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        idx.add(bad)
    idx.add(torch.randn(5, 8))
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="queries contains NaN or inf"):
        idx.search(bad, 1)
    with pytest.raises(ValueError, match="exceeds"):
        idx.search(torch.randn(2, 8), 6)
    with pytest.raises(ValueError, match="queries must have shape"):
        idx.search(torch.randn(2, 7), 1)
    with pytest.raises(ValueError, match="exclude_ids"):
        idx.search(torch.randn(2, 8), 1, exclude_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="metric"):
        Index(8, metric="dot")
    with pytest.raises(ValueError, match="kind"):
        Index(8, kind="hnsw")
    with pytest.raises(TypeError, match="1-D integer"):
        idx.remove(torch.tensor([0.5]))


@needs_faiss
def test_ivf_pq_refine_reranks_exactly_and_recovers_recall():
    """refine > 1: PQ candidates are re-scored against the stored vectors — returned scores are the exact ones of
    the returned ids, and recall@10 beats the compressed ranking's (refine=1)."""
    x = _clustered(6000, 32, 5, clusters=30)
    q = x[:200] + 0.05 * torch.randn(200, 32, generator=torch.Generator().manual_seed(1))
    exact = Index(32, metric="l2", kind="flat")
    exact.add(x)
    _, truth = exact.search(q, 10)

    def recall(refine):
        idx = Index(32, metric="l2", kind="ivf_pq", nlist=16, nprobe=16, pq_m=8, refine=refine)
        idx.add(x)
        idx.train()
        s, i = idx.search(q, 10)
        return s, i, sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(i, truth)) / truth.numel()

    _, _, r1 = recall(1)
    s, i, r8 = recall(8)
    assert r8 > r1 and r8 >= 0.95, (r1, r8)
    torch.testing.assert_close(s, ((x[i] - q[:, None]) ** 2).sum(-1))  # exact distances of the returned ids
    with pytest.raises(ValueError, match="refine"):
        Index(32, kind="ivf_pq", refine=0)


# -- target_recall: calibrated nprobe / refine ---------------------------------------------------------------------
def _law(law: str, n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    """Data laws of the retrieval benchmark, small: tight well-separated clusters, loose overlapping ones, isotropic."""
    if law == "tight":
        return _clustered(n, d, seed, clusters=200, noise=0.3)
    if law == "loose":
        return _clustered(n, d, seed, clusters=20, noise=1.0)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _recall_of(ids: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)) / truth.numel()


def _calibrated_index(x, **kw) -> Index:
    kw = {"metric": "cosine", "kind": "ivf_flat", "target_recall": 0.95, **kw}
    idx = Index(x.shape[1], **kw)
    idx.add(x)
    idx.train()
    return idx


@needs_faiss
@pytest.mark.parametrize("law,kind,n", [("tight", "ivf_flat", 12000), ("loose", "ivf_flat", 12000),
                                        ("isotropic", "ivf_flat", 12000), ("loose", "ivf_pq", 6000)])
def test_target_recall_is_reached_and_matches_an_independent_measurement(law, kind, n):
    """Calibration picks nprobe (and refine) reaching the target on held-out stored vectors; recall measured on
    fresh queries from the same law agrees with the reported estimate within a few standard errors."""
    data = _law(law, n + 400)
    x, q = data[:n], data[n:]  # queries: new draws of the law, not copies of stored rows
    idx = _calibrated_index(x, kind=kind)
    cal = idx.calibrated
    assert cal["reached"] and cal["recall"] >= 0.95 and cal["queries"] == 512 and cal["k"] == 10
    assert idx.nprobe == cal["nprobe"] and cal["nprobe"] & (cal["nprobe"] - 1) == 0 and cal["nprobe"] <= idx.nlist
    assert (cal["refine"] == idx.refine) if kind == "ivf_pq" else cal["refine"] is None
    exact = Index(x.shape[1], metric="cosine", backend="torch")
    exact.add(x)
    truth = exact.search(q, 10)[1]
    measured = _recall_of(idx.search(q, 10)[1], truth)
    assert abs(measured - cal["recall"]) <= max(0.03, 4 * cal["stderr"]), (measured, cal)
    if cal["nprobe"] > 1:  # the setting is the cheapest power of two: half the probes misses the target
        idx.nprobe = cal["nprobe"] // 2
        if kind == "ivf_pq":
            idx.refine = 32
        held_out, own = idx._sample_stored(256)
        ref = exact.search(held_out, 10, exclude_ids=own)[1]
        assert _recall_of(idx.search(held_out, 10, exclude_ids=own)[1], ref) < 0.95


@needs_faiss
def test_target_recall_unreachable_warns_and_keeps_the_best_setting():
    """IVF-PQ with 2 sub-quantizers of 4 bits on isotropic data: even all lists and refine 32 stay far below 0.95
    (more lists can even lower recall: more badly ranked codes compete for the 32·k re-ranked slots)."""
    x = _law("isotropic", 5000)
    with pytest.warns(UserWarning, match=r"target_recall=0\.95 not reached.*\(nprobe=\d+ of nlist=16, refine=\d+\) "
                                         r"reaches recall@10 = 0\.\d+ on 64 calibration queries.*kind='flat'"):
        idx = _calibrated_index(x, metric="l2", kind="ivf_pq", nlist=16, pq_m=2, pq_nbits=4, calibration_queries=64)
    cal = idx.calibrated
    assert not cal["reached"] and cal["recall"] < 0.9 and (idx.nprobe, idx.refine) == (cal["nprobe"], cal["refine"])
    held_out, own = idx._sample_stored(64)  # the kept setting is the best one tried
    exact = idx.search(held_out, 10, exclude_ids=own, exact=True)[1]
    for nprobe in (1, 2, 4, 8, 16):
        idx.nprobe, idx.refine = nprobe, 32
        assert _recall_of(idx.search(held_out, 10, exclude_ids=own)[1], exact) <= cal["recall"] + 1e-9
    with pytest.warns(UserWarning, match=r"needs nprobe = nlist = 4 .*exact search \(kind='flat'\)"):
        full_scan = _calibrated_index(x, metric="l2", nlist=4, target_recall=0.99)  # isotropic: no lists to skip
    assert full_scan.calibrated["reached"] and full_scan.nprobe == 4


def test_target_recall_validation():
    for bad in (0, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.9"):
        with pytest.raises(ValueError, match="target_recall must be a number with 0 < target_recall <= 1"):
            Index(8, kind="ivf_flat", target_recall=bad)
    with pytest.raises(ValueError, match=r"a fraction: 0\.95 for 95 %"):
        Index(8, kind="ivf_flat", target_recall=95)
    for name in ("calibration_queries", "calibration_k"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            Index(8, kind="ivf_flat", target_recall=0.9, **{name: 0})
    with pytest.raises(ValueError, match="calibrate\\(\\) needs a target"):
        _small_index().calibrate()
    flat = Index(8, kind="flat", target_recall=1.0)  # exact: recall 1.0 by construction, nothing to calibrate
    assert flat.calibrated["recall"] == 1.0 and flat.calibrated["reached"] and flat.calibrated["nprobe"] is None
    assert Index(8, kind="flat").calibrated is None


@needs_faiss
def test_calibration_is_deterministic_lazy_and_redone_on_retraining():
    x = _law("loose", 8000)
    a, b = _calibrated_index(x), Index(32, metric="cosine", kind="ivf_flat", target_recall=0.95)
    b.add(x)
    assert b.calibrated is None
    q = _law("loose", 50, seed=9)
    _, ib = b.search(q, 10)  # trains, then calibrates, before the first approximate search
    drop = lambda c: {k: v for k, v in c.items() if k != "seconds"}  # noqa: E731
    assert drop(a.calibrated) == drop(b.calibrated)
    assert torch.equal(a.search(q, 10)[1], ib)
    before = dict(a.calibrated)
    a.reset()
    a.add(x[:6000])  # epoch refresh: no re-training, the setting stays
    assert a.calibrated == before
    a.reset()
    a.add(_law("isotropic", 8000))
    a.train()  # re-training re-calibrates (isotropic data needs more probes than loose clusters)
    assert a.calibrated is not before and a.calibrated["nprobe"] > before["nprobe"]
    assert a.calibrated["reached"] and a.nprobe == a.calibrated["nprobe"]
    c = Index(32, metric="cosine", kind="ivf_flat", target_recall=0.95)
    c.train(x)  # trained on an empty index: calibrated lazily once vectors are there
    assert c.calibrated is None
    c.add(x)
    c.search(q, 10)
    assert c.calibrated["reached"] and c.calibrated["recall"] >= 0.95
    given = c.calibrate(q)  # queries from the application's own distribution: no self-exclusion
    assert given["source"] == "given queries" and given["queries"] == 50 and given["recall"] >= 0.95


@needs_faiss
def test_calibration_survives_save_load_and_works_sharded(tmp_path, monkeypatch):
    x = _law("loose", 8000)
    idx = _calibrated_index(x, devices=["cpu", "cpu"])  # one shard per device: calibrated over both
    assert idx.calibrated["reached"] and len(idx._shards) == 2
    q = _law("loose", 40, seed=5)
    before = idx.search(q, 10)
    path = tmp_path / "idx.pt"
    idx.save(str(path))
    monkeypatch.setattr(Index, "_calibrate", lambda self, queries: pytest.fail("re-calibrated after load"))
    loaded = Index.load(str(path))
    assert loaded.calibrated == idx.calibrated and loaded.target_recall == 0.95
    assert (loaded.nprobe, loaded.refine) == (idx.nprobe, idx.refine)
    after = loaded.search(q, 10)
    assert torch.equal(before[1], after[1])
    single = Index.load(str(path), devices=["cpu", "cpu"])
    assert single.calibrated == idx.calibrated


@needs_faiss
def test_calibration_queries_are_held_out_of_the_training_sample(monkeypatch):
    """Leave-one-out on vectors the k-means never saw: the estimate is that of fresh queries of the same law."""
    seen = []
    real_train = index_mod._Shard.train
    monkeypatch.setattr(index_mod._Shard, "train", lambda self, sample, nlist: (seen.append(sample),
                                                                                  real_train(self, sample, nlist)))
    x = _law("loose", 6000)
    idx = _calibrated_index(x, nlist=32, calibration_queries=100)  # train sample 64·32 = 2048 of 6000
    held_out, _ = idx._sample_stored(100)
    assert len(seen) == 1 and seen[0].shape[0] == 2048 and idx.calibrated["queries"] == 100
    assert not (torch.cdist(held_out, seen[0]) < 1e-6).any()
