"""Collectives under 2 gloo processes: the gathers models use (with gradient), the sharded pass over a split, and
sharded retrieval (ShardedIndex / ShardedMemoryBank) against their single-process counterparts."""
from __future__ import annotations


import pytest
import torch
import torch.multiprocessing as mp

from msa_fast.distributed import BatchScope, encode_batches_sharded, shard_bounds
from msa_fast.retrieval.index import Index
from msa_fast.retrieval.memory_bank import MemoryBank
from msa_fast.retrieval.sharded import ShardedIndex, ShardedMemoryBank
from msa_fast.train.dist import leave_process_group

WORLD = 2


def _worker(rank: int, fn_name: str, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    completed = False
    try:
        result = globals()[fn_name](rank)
        torch.save(result, f"{out}.{rank}")
        completed = True
    finally:
        leave_process_group(completed)


def _spawn(tmp_path, fn_name: str) -> list:
    """Run ``fn_name(rank)`` on WORLD gloo ranks; their return values, by rank."""
    init = f"file://{tmp_path}/store"
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(fn_name, init, out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------------------------
# BatchScope: the global batch with gradient
# ---------------------------------------------------------------------------------------------------------------
def _objective(h: torch.Tensor) -> torch.Tensor:
    """A cross-sample objective: per row, the softmax-weighted mean of the other rows, squared."""
    sim = h @ h.T - 1e4 * torch.eye(len(h))
    return (torch.softmax(sim, dim=1) @ h).pow(2).sum(dim=1)  # (B,) per-row losses


def _global_batch_grads(rank: int):
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64)  # "parameters", the same on every rank
    x = torch.randn(7, 4, dtype=torch.float64)  # the global batch of 7 rows
    sizes = (4, 3)
    bounds = shard_bounds(7, WORLD)
    assert bounds == [0, 4, 7]
    w_local = w.clone().requires_grad_(True)
    scope = BatchScope(rank, sizes)
    rows, mine = scope.gather(x[bounds[rank]:bounds[rank + 1]] @ w_local)
    loss = _objective(rows)[mine].sum() / 7  # this rank's share of the global mean
    loss.backward()
    grad = w_local.grad.clone()
    torch.distributed.all_reduce(grad)  # what DDP's all-reduce (× world / world) delivers
    # a stand-in rank (0 real rows) takes part in the gather and adds nothing
    w2 = w.clone().requires_grad_(True)
    scope2 = BatchScope(rank, (7, 0))
    local = x if rank == 0 else x[:1]
    rows2, mine2 = scope2.gather(local @ w2)
    loss2 = _objective(rows2)[mine2].sum() / 7
    loss2.backward()
    grad2 = w2.grad.clone()
    torch.distributed.all_reduce(grad2)
    return {"grad": grad, "grad_standin": grad2, "rows": rows.detach(), "n_rows2": rows2.shape[0]}


def test_batch_scope_gathers_the_global_batch_with_gradient(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 4, dtype=torch.float64)
    (_objective(x @ w).mean()).backward()
    for res in _spawn(tmp_path, "_global_batch_grads"):
        torch.testing.assert_close(res["rows"], (x @ w).detach())
        torch.testing.assert_close(res["grad"], w.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["grad_standin"], w.grad, rtol=1e-12, atol=1e-12)
        assert res["n_rows2"] == 7


def test_batch_scope_is_identity_in_one_process():
    x = torch.randn(5, 2)
    rows, mine = BatchScope().gather(x)
    assert rows is x and mine == slice(0, 5)
    rows, mine = BatchScope(0, (5, 4), local=True).gather(x)
    assert rows is x and mine == slice(0, 5)


def _sharded_encode(rank: int):
    data = torch.arange(23 * 2, dtype=torch.float32).reshape(23, 2)
    seen = []

    def encode(rows: range) -> dict:
        seen.append((rows.start, rows.stop))
        return {"y": data[rows.start:rows.stop] * 2, "i": torch.arange(rows.start, rows.stop)}

    return {"out": encode_batches_sharded(23, 5, encode), "seen": seen}


def test_encode_batches_sharded_deals_batches_and_gathers_in_row_order(tmp_path):
    data = torch.arange(23 * 2, dtype=torch.float32).reshape(23, 2)
    results = _spawn(tmp_path, "_sharded_encode")
    for res in results:
        torch.testing.assert_close(res["out"]["y"], data * 2)
        assert res["out"]["i"].tolist() == list(range(23))
    # the single-process batches, dealt round-robin: each encoded exactly once
    assert results[0]["seen"] == [(0, 5), (10, 15), (20, 23)] and results[1]["seen"] == [(5, 10), (15, 20)]


# ---------------------------------------------------------------------------------------------------------------
# ShardedIndex
# ---------------------------------------------------------------------------------------------------------------
def _database(n=600, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, dim, generator=g) * 3
    x = centers[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, dim, generator=g)
    q = x[torch.randperm(n, generator=g)[:37]] + 0.3 * torch.randn(37, dim, generator=g)
    return x, q


def _sharded_search(rank: int):
    x, q = _database()
    out = {}
    for metric in ("cosine", "l2"):
        idx = ShardedIndex(16, metric=metric, kind="flat")
        mine = torch.arange(rank, len(x), WORLD)  # rank r holds 1/world of the vectors
        idx.add(x[mine], mine)
        assert idx.ntotal == len(x)
        # ragged queries: rank 0 asks 20, rank 1 asks 17 (with self-exclusion of a database id)
        qs = q[:20] if rank == 0 else q[20:]
        excl = torch.arange(len(qs)) * 3 + rank
        out[metric] = idx.search(qs, 5), idx.search(qs, 5, exclude_ids=excl)
    ivf = ShardedIndex(16, metric="cosine", kind="ivf_flat", nlist=8, nprobe=4)
    mine = torch.arange(rank, len(x), WORLD)
    ivf.add(x[mine], mine)
    ivf.train()
    out["ivf"] = ivf.search(q[:20] if rank == 0 else q[20:], 10)
    out["empty_queries"] = ivf.search(q[:0], 10) if rank == 1 else ivf.search(q[:3], 10)
    return out


def test_sharded_index_equals_the_single_index_and_ivf_keeps_recall(tmp_path):
    x, q = _database()
    results = _spawn(tmp_path, "_sharded_search")
    for metric in ("cosine", "l2"):
        single = Index(16, metric=metric, kind="flat", backend="torch")
        single.add(x)
        for rank, res in enumerate(results):
            qs = q[:20] if rank == 0 else q[20:]
            excl = torch.arange(len(qs)) * 3 + rank
            (s, i), (se, ie) = res[metric]
            rs, ri = single.search(qs, 5)
            torch.testing.assert_close(i, ri, rtol=0, atol=0)
            torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-5)
            rse, rie = single.search(qs, 5, exclude_ids=excl)
            torch.testing.assert_close(ie, rie, rtol=0, atol=0)
            torch.testing.assert_close(se, rse, rtol=1e-5, atol=1e-5)
    exact = Index(16, metric="cosine", kind="flat", backend="torch")
    exact.add(x)
    hits = total = 0
    for rank, res in enumerate(results):
        qs = q[:20] if rank == 0 else q[20:]
        _, truth = exact.search(qs, 10)
        _, got = res["ivf"]
        hits += sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth))
        total += truth.numel()
    assert hits / total >= 0.9, hits / total  # 4 of 8 lists probed on clustered data
    assert results[1]["empty_queries"][0].shape == (0, 10) and results[0]["empty_queries"][0].shape == (3, 10)


def _sharded_calibration(rank: int):
    """Uneven shards (rank 0 holds 2/3, with the tighter clusters): the calibration must be one decision over the
    merged search, not one per shard."""
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(24, 16, generator=g) * 1.5
    x = centers[torch.randint(0, 24, (1500,), generator=g)] + torch.randn(1500, 16, generator=g)
    x[1000:] += 3.0 * torch.randn(500, 16, generator=g)  # rank 1's vectors: looser clusters
    # (calibrated alone, an Index over rank 0's vectors picks nprobe 2, over rank 1's 16; over all of them 8)
    mine = torch.arange(0, 1000) if rank == 0 else torch.arange(1000, 1500)
    idx = ShardedIndex(16, metric="cosine", kind="ivf_flat", nlist=32, target_recall=0.95, calibration_queries=90)
    idx.add(x[mine], mine)
    idx.train()  # trains the shared quantizer, then calibrates (a collective)
    cal = dict(idx.calibrated)
    # recount the decision from this rank's calibration queries: hits at the chosen nprobe and at half of it
    share = -(-90 * len(mine) // 1500)
    q, excl = idx.local._sample_stored(share)
    _, truth = idx.search(q, cal["k"], exclude_ids=excl, exact=True)
    counts = {}
    for nprobe in {cal["nprobe"], max(cal["nprobe"] // 2, 1)}:
        idx.local.nprobe = nprobe
        got = idx.search(q, cal["k"], exclude_ids=excl)[1]
        counts[nprobe] = (sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth)), truth.numel())
    return cal, counts, len(q)


def test_sharded_calibration_is_one_decision_over_the_merged_search(tmp_path):
    (cal0, counts0, m0), (cal1, counts1, m1) = _spawn(tmp_path, "_sharded_calibration")
    assert {k: v for k, v in cal0.items() if k != "seconds"} == {k: v for k, v in cal1.items() if k != "seconds"}
    assert cal0["queries"] == m0 + m1 == 90 and (m0, m1) == (60, 30)
    assert cal0["reached"] and cal0["recall"] >= 0.95 and cal0["source"].startswith("stored vectors of every shard")
    nprobe = cal0["nprobe"]
    hits = sum(c[nprobe][0] for c in (counts0, counts1))
    total = sum(c[nprobe][1] for c in (counts0, counts1))
    assert cal0["recall"] == pytest.approx(hits / total, abs=1e-12)  # the recall of both ranks' queries together
    if nprobe > 1:  # the cheapest setting: half the lists misses the target
        half = nprobe // 2
        assert sum(c[half][0] for c in (counts0, counts1)) / total < 0.95


# ---------------------------------------------------------------------------------------------------------------
# ShardedMemoryBank
# ---------------------------------------------------------------------------------------------------------------
def _bank_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d = 40, 8
    emb = torch.randn(n, d, generator=g)
    emb[5] = 0.0  # an all-zero row: excluded from the fallback mean
    avail = torch.rand(n, generator=g) > 0.2
    q = torch.randn(9, d, generator=g)
    q[0] = 0.0  # entry sum 0: HME's fallback
    return emb, avail, q


def _bank_cases():
    return [dict(k=None, threshold=0.2, weighting="mean"), dict(k=4, threshold=None, weighting="softmax"),
            dict(k=6, threshold=0.0, weighting="similarity"), dict(k=None, threshold=0.99, weighting="mean")]


def _sharded_bank(rank: int):
    emb, avail, q = _bank_data()
    bank = ShardedMemoryBank(40, 8, ("a",))
    # each rank writes an interleaved half of the samples (as a data-parallel epoch would), in two steps
    rows = torch.arange(rank, 40, WORLD)
    for part in (rows[:7], rows[7:]):
        bank.update("a", part, emb[part], avail[part])
    qs = q[:5] if rank == 0 else q[5:]
    excl = torch.tensor([-1, 3, 4, -1, 7]) if rank == 0 else torch.tensor([10, -1, -1, 2])
    out = []
    for case in _bank_cases():
        out.append(bank.retrieve("a", qs, exclude_ids=excl, fallback_mask=qs.sum(1) == 0, **case)[0])
    return out


def test_sharded_memory_bank_equals_the_single_bank(tmp_path):
    emb, avail, q = _bank_data()
    single = MemoryBank(40, 8, ("a",), index_kwargs={"backend": "torch"})
    single.update("a", torch.arange(40), emb, avail)
    results = _spawn(tmp_path, "_sharded_bank")
    excl = torch.tensor([-1, 3, 4, -1, 7, 10, -1, -1, 2])
    for j, case in enumerate(_bank_cases()):
        ref, _ = single.retrieve("a", q, exclude_ids=excl, fallback_mask=q.sum(1) == 0, **case)
        got = torch.cat([results[0][j], results[1][j]])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{case}: {m}")


def test_sharded_retrieval_in_one_process_is_the_plain_one():
    emb, avail, q = _bank_data()
    bank = ShardedMemoryBank(40, 8, ("a",))
    bank.update("a", torch.arange(40), emb, avail)
    single = MemoryBank(40, 8, ("a",), index_kwargs={"backend": "torch"})
    single.update("a", torch.arange(40), emb, avail)
    fb = q.sum(1) == 0  # the zero query ties every row: its top-k is arbitrary, HME sends it to the fallback
    for case in _bank_cases():
        torch.testing.assert_close(bank.retrieve("a", q, fallback_mask=fb, **case)[0],
                                   single.retrieve("a", q, fallback_mask=fb, **case)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="explicit global ids"):
        ShardedIndex(8).add(emb, None)
    with pytest.raises(ValueError, match="weighting"):
        bank.retrieve("a", q, k=None, weighting="max")
