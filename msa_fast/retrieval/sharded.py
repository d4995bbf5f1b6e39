"""Retrieval sharded across the ranks of a ``torch.distributed`` process group: each rank holds 1/world of the
vectors, every rank's queries are answered by all shards and merged.

- ``ShardedIndex``: an ``Index`` per rank (FAISS GPU when the rank's device is CUDA and faiss sees a GPU, FAISS CPU
  or torch otherwise) over the vectors that rank adds. ``search`` returns what one ``Index`` holding every rank's
  vectors returns (exact kind: the same ids and scores; IVF: one coarse quantizer for every shard, trained by rank 0
  on a sample drawn from every shard and broadcast, so a query probes the same lists on every shard). With
  ``target_recall`` the calibration is a collective too: calibration queries drawn from every shard (proportional to
  its size, held out of the IVF training sample, own id excluded), searched over all shards, recall@k summed over
  ranks, so every rank keeps the same ``nprobe`` / ``refine`` and ``calibrated`` reports the recall of the merged
  search — the one a single ``Index`` over all the vectors would calibrate for.
- ``ShardedMemoryBank``: the ``MemoryBank`` rule (threshold / k nearest available rows, mean / similarity /
  softmax weights, HME's fallback) with row ``i`` owned by rank ``i % world``; writes are routed to the owners, a
  retrieval aggregates partial sums on each shard and reduces them — the retrieved vectors never travel.

Every method that needs the other shards is a **collective**: all ranks call it together, each with its own
(possibly empty, possibly differently sized) queries or rows. Without a process group (one process) both behave
as their single-process counterparts. Communication per query: ``world · k`` (score, id) pairs (index) or one
``d``-vector and a few scalars (bank), plus the queries themselves.
"""
from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .index import Index, _hits, _recall, calibration_report, calibration_sweep, check_vectors, faiss_or_none, merge_topk
from .memory_bank import WEIGHTINGS, _check_temperature

DeviceLike = Union[str, torch.device]


# ---------------------------------------------------------------------------------------------------------------
# collectives over ragged row blocks
# ---------------------------------------------------------------------------------------------------------------
def _group() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _comm_device() -> torch.device:
    """Where collective buffers must live: the rank's GPU under NCCL, the CPU under gloo."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_sizes(n: int) -> list[int]:
    """Every rank's ``n`` (a collective)."""
    _, world = _group()
    dev = _comm_device()
    parts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world)]
    torch.distributed.all_gather(parts, torch.tensor([n], dtype=torch.long, device=dev))
    return [int(p) for p in parts]


def _all_gather_ragged(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Concatenation over ranks of x (sizes[rank], ...) → (sum(sizes), ...) on x's device."""
    dev = _comm_device()
    width = max(sizes)
    if width == 0:
        return x.new_zeros((0, *x.shape[1:]))
    buf = x.new_zeros((width, *x.shape[1:]), device=dev)
    buf[:x.shape[0]] = x.to(dev)
    parts = [torch.empty_like(buf) for _ in sizes]
    torch.distributed.all_gather(parts, buf)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device)


def _all_reduce(x: Tensor, op: Any = None) -> Tensor:
    dev = _comm_device()
    y = x.to(dev).clone()
    torch.distributed.all_reduce(y, op=op or torch.distributed.ReduceOp.SUM)
    return y.to(x.device)


def _offset(sizes: Sequence[int]) -> slice:
    rank, _ = _group()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


# ---------------------------------------------------------------------------------------------------------------
# index
# ---------------------------------------------------------------------------------------------------------------
class ShardedIndex:
    """kNN over the union of every rank's vectors. Args as ``Index`` (dim, metric, kind, nlist, nprobe, pq_m, ...,
    device of this rank's shard, backend, exact_engine, seed); ``train_size`` is the size of the IVF training
    sample over all shards together.

    ``add(x, ids)`` and ``reset()`` are local (ids are global and must be unique across ranks: give each rank its
    own, e.g. sample ids); ``train()``, ``search()`` and ``ntotal`` are collectives.
    """

    def __init__(self, dim: int, metric: str = "cosine", kind: str = "flat", *, device: DeviceLike = "cpu",
                 **index_kwargs: Any):
        if "devices" in index_kwargs:
            raise ValueError("ShardedIndex shards across ranks: give each rank's device with device=, not devices=")
        self.local = Index(dim, metric=metric, kind=kind, device=device, **index_kwargs)
        self.dim, self.metric, self.kind = dim, metric, kind

    # -- local mutation ----------------------------------------------------------------------------------------
    def add(self, x: Tensor, ids: Tensor) -> Tensor:
        """Add this rank's vectors x (n, dim) with global ids (n,) int64 ≥ 0 (required: unique across ranks)."""
        if ids is None:
            raise ValueError("ShardedIndex.add needs explicit global ids (unique across ranks)")
        return self.local.add(x, ids)

    def reset(self) -> None:
        self.local.reset()

    # -- collectives ---------------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Vectors over all shards (a collective)."""
        if _group()[1] == 1:
            return self.local.ntotal
        return int(_all_reduce(torch.tensor([self.local.ntotal]))[0])

    def train(self) -> None:
        """Train the IVF coarse quantizer once for all shards: a sample from every shard (proportional to its size,
        ``train_size`` in total, seeded), gathered; rank 0 trains; the trained empty index is broadcast and adopted
        by every shard, so every rank probes the same lists. No-op for flat."""
        idx = self.local
        rank, world = _group()
        if not idx.approximate:
            return
        if world == 1:
            idx.train()
            return
        sizes = _all_sizes(idx.ntotal)
        n = sum(sizes)
        nlist = idx.nlist or _default_nlist_for(n)
        budget = idx.train_size or max(64 * nlist, 40 << idx.pq_nbits if idx.kind == "ivf_pq" else 0)
        local = torch.cat([s.x.cpu() for s in idx._shards])
        pool = torch.arange(len(local))
        if idx.target_recall is not None:  # hold this shard's calibration queries out (as Index.train does)
            keep = torch.ones(len(local), dtype=torch.bool)
            keep[idx._calibration_positions(len(local), _calibration_share(idx, sizes, rank))] = False
            pool = pool[keep]
        take = min(len(pool), -(-budget * sizes[rank] // max(n, 1)))  # this shard's share, rounded up
        g = torch.Generator().manual_seed(idx.seed * 1_000_003 + rank)
        sample_local = local[pool[torch.randperm(len(pool), generator=g)[:take]]]
        sample = _all_gather_ragged(sample_local, _all_sizes(len(sample_local)))
        payload: list[Any] = [None]
        if rank == 0:
            scratch = Index(self.dim, metric=self.metric, kind=self.kind, nlist=nlist, nprobe=idx.nprobe,
                            pq_m=idx.pq_m, pq_nbits=idx.pq_nbits, refine=idx.refine, train_size=len(sample),
                            backend="faiss", seed=idx.seed)
            scratch.train(sample)  # vectors are stored normalised already: metric-prepared again is idempotent
            faiss = faiss_or_none()
            empty = faiss.clone_index(scratch._shards[0].ivf)
            empty.reset()
            payload = [bytes(faiss.serialize_index(empty))]
        torch.distributed.broadcast_object_list(payload, src=0)
        faiss = faiss_or_none()
        import numpy as np

        trained = faiss.deserialize_index(np.frombuffer(payload[0], dtype=np.uint8))
        idx.nlist = nlist
        for s in idx._shards:
            s.adopt_trained(trained)
        idx.calibrated = None  # a new quantizer: the old setting no longer applies
        if idx.target_recall is not None and n >= 2:
            self.calibrate()

    @property
    def calibrated(self) -> Optional[dict]:
        """``Index.calibrated`` of the merged search (the same on every rank); None before calibration."""
        return self.local.calibrated

    def calibrate(self) -> dict:
        """``Index.calibrate`` over all shards (a collective): each rank draws its share of ``calibration_queries``
        from its stored vectors (own id excluded), exact ground truth and the candidate settings are searched over
        every shard, and the recall@k that decides is summed over the ranks. Sets the same ``nprobe`` / ``refine``
        on every rank and returns ``calibrated``."""
        idx = self.local
        rank, world = _group()
        if world == 1:
            return idx.calibrate()
        settled = idx._settled_calibration(self.train, "ShardedIndex")
        if settled is not None:
            return settled
        t0 = time.perf_counter()
        sizes = _all_sizes(idx.ntotal)
        n = sum(sizes)
        if n < 2:
            raise ValueError(f"calibration needs at least 2 stored vectors over all shards, got {n}")
        m = _calibration_share(idx, sizes, rank)
        if m:
            q, exclude = idx._sample_stored(m)
        else:
            q, exclude = torch.zeros(0, self.dim, device=idx.device), torch.zeros(0, dtype=torch.long)
        k = min(idx.calibration_k, n - 1)
        idx._calibrating = True  # the local searches below must not calibrate the shard on its own
        try:
            _, truth = self.search(q, k, exclude_ids=exclude, exact=True)

            def recall_at(nprobe: int, refine: int) -> float:
                idx.nprobe, idx.refine = nprobe, refine
                hits = _hits(self.search(q, k, exclude_ids=exclude)[1], truth)
                found, valid = (float(v) for v in _all_reduce(
                    torch.tensor([float(hits.sum()), float((truth >= 0).sum())], dtype=torch.float64)))
                return found / max(valid, 1.0)

            recall, reached = calibration_sweep(idx, recall_at)
            per_query = _recall(self.search(q, k, exclude_ids=exclude)[1], truth, per_query=True).cpu()
            moments = _all_reduce(torch.stack([per_query.new_tensor(float(len(per_query))), per_query.sum(),
                                               (per_query ** 2).sum()]).double().cpu())
        finally:
            idx._calibrating = False
        count, total, squares = (float(v) for v in moments)
        var = (squares - total * total / count) / (count - 1) if count > 1 else 0.0
        stderr = math.sqrt(max(var, 0.0) / count) if count > 1 else 0.0
        idx.calibrated = calibration_report(idx, recall, reached, stderr, int(count), k,
                                            "stored vectors of every shard, own id excluded", t0)
        return idx.calibrated

    def search(self, q: Tensor, k: int, exclude_ids: Optional[Tensor] = None,
               exact: bool = False) -> tuple[Tensor, Tensor]:
        """This rank's queries q (nq, dim) (nq may be 0 and differ by rank) → (scores (nq, k), ids (nq, k)), best
        first, as ``Index.search`` over all shards' vectors. A collective."""
        rank, world = _group()
        if world == 1:
            return self.local.search(q, k, exclude_ids=exclude_ids, exact=exact)
        check_vectors(q, self.dim, "queries")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        n = self.ntotal
        if n == 0:
            raise ValueError("cannot search an empty sharded index (add vectors first)")
        if k > n:
            raise ValueError(f"k={k} exceeds the number of indexed vectors over all shards ({n})")
        if exclude_ids is not None and (tuple(exclude_ids.shape) != (q.shape[0],) or exclude_ids.is_floating_point()):
            raise ValueError(f"exclude_ids must be an int tensor of shape ({q.shape[0]},), "
                             f"got {tuple(exclude_ids.shape)} {exclude_ids.dtype}")
        if self.local.approximate and not exact and not self.local.is_trained:
            self.train()
        if (self.local.approximate and not exact and self.local.target_recall is not None
                and self.local.calibrated is None and not self.local._calibrating):
            self.calibrate()  # every rank takes this branch together: their calibration state is the same
        largest = self.metric != "l2"
        sizes = _all_sizes(q.shape[0])
        queries = _all_gather_ragged(q.detach().to(torch.float32), sizes)
        excl = None
        if exclude_ids is not None:
            excl = _all_gather_ragged(exclude_ids.to(torch.long).reshape(-1, 1), sizes)[:, 0]
        nq = queries.shape[0]
        fill = float("-inf") if largest else float("inf")
        scores = torch.full((nq, k), fill, dtype=torch.float32, device=queries.device)
        ids = torch.full((nq, k), -1, dtype=torch.long, device=queries.device)
        kk = min(k, self.local.ntotal)
        if kk and nq:
            s, i = self.local.search(queries, kk, exclude_ids=excl, exact=exact)
            scores[:, :kk], ids[:, :kk] = s.to(scores.device), i.to(ids.device)
        # every shard's top-k of every query, then each rank merges its own queries
        all_scores = _all_gather_ragged(scores.reshape(1, nq, k), [1] * world)
        all_ids = _all_gather_ragged(ids.reshape(1, nq, k), [1] * world)
        mine = _offset(sizes)
        out_s, out_i = merge_topk(list(all_scores[:, mine]), list(all_ids[:, mine]), k, largest)
        return out_s.to(q.device), out_i.to(q.device)


def _calibration_share(idx: Index, sizes: Sequence[int], rank: int) -> int:
    """This rank's share of ``idx.calibration_queries`` (proportional to its size, rounded up, at most its size)."""
    n = sum(sizes)
    return min(sizes[rank], -(-min(idx.calibration_queries, n) * sizes[rank] // max(n, 1)))


def _default_nlist_for(n: int) -> int:
    from .index import _default_nlist

    return _default_nlist(n)


# ---------------------------------------------------------------------------------------------------------------
# memory bank
# ---------------------------------------------------------------------------------------------------------------
class ShardedMemoryBank:
    """``MemoryBank`` semantics (see ``msa_fast.retrieval.memory_bank``) with the rows split across ranks: rank r
    stores the rows ``i`` with ``i % world == r`` (flat, exact scoring by one GEMM per shard).

    ``update`` and ``retrieve`` are collectives: each rank passes its own batch (any ids) / its own queries; the
    result is what one ``MemoryBank`` receiving every rank's writes returns for these queries. Momentum (EMA) and
    ``exclude_ids`` as in ``MemoryBank``.
    """

    def __init__(self, num_samples: int, dims: Union[int, dict], modalities: Sequence[str] = ("l", "a", "v"), *,
                 momentum: Optional[float] = None, metric: str = "cosine", device: DeviceLike = "cpu"):
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if metric not in ("ip", "cosine", "l2"):
            raise ValueError(f"metric must be one of ('ip', 'cosine', 'l2'), got {metric!r}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or None (overwrite), got {momentum}")
        self.rank, self.world = _group()
        self.modalities = tuple(modalities)
        self.dims = {m: (dims if isinstance(dims, int) else int(dims[m])) for m in self.modalities}
        self.num_samples, self.momentum, self.metric = num_samples, momentum, metric
        self.device = torch.device(device)
        #: the global sample ids this rank owns
        self.owned = torch.arange(self.rank, num_samples, self.world, device=self.device)
        n = len(self.owned)
        self.storage = {m: torch.zeros(n, d, device=self.device) for m, d in self.dims.items()}
        self.written = {m: torch.zeros(n, dtype=torch.bool, device=self.device) for m in self.modalities}
        self.available = {m: torch.zeros(n, dtype=torch.bool, device=self.device) for m in self.modalities}

    def update(self, modality: str, ids: Tensor, embeddings: Tensor, available: Optional[Tensor] = None) -> None:
        """Every rank writes its batch (ids (n,), embeddings (n, d), available (n,) bool); rows go to their owners.
        Ids written by two ranks in one call: the higher rank's row wins (as if the ranks wrote in order)."""
        self._check_modality(modality)
        check_vectors(embeddings, self.dims[modality], "embeddings")
        ids = torch.as_tensor(ids).to(torch.long).reshape(-1)
        if ids.shape[0] != embeddings.shape[0]:
            raise ValueError(f"ids must have shape ({embeddings.shape[0]},), got {tuple(ids.shape)}")
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise ValueError(f"ids must lie in [0, {self.num_samples})")
        if available is None:
            available = torch.ones(len(ids), dtype=torch.bool)
        if tuple(available.shape) != (len(ids),) or available.dtype != torch.bool:
            raise ValueError(f"available must be a bool tensor of shape ({len(ids)},), got "
                             f"{available.dtype} {tuple(available.shape)}")
        if self.world > 1:
            sizes = _all_sizes(len(ids))
            ids = _all_gather_ragged(ids.to(self.device), sizes)
            embeddings = _all_gather_ragged(embeddings.detach().to(self.device, torch.float32), sizes)
            available = _all_gather_ragged(available.to(self.device, torch.uint8), sizes).bool()
        ids, x, avail = ids.to(self.device), embeddings.detach().to(self.device, torch.float32), available.to(self.device)
        mine = ids % self.world == self.rank
        rows, x, avail = ids[mine] // self.world, x[mine], avail[mine]
        store = self.storage[modality]
        if self.momentum is not None:
            seen = (self.written[modality][rows] & avail)[:, None]
            x = torch.where(seen, self.momentum * store[rows] + (1.0 - self.momentum) * x, x)
        store[rows] = torch.where(avail[:, None], x, store[rows])
        self.written[modality][rows] |= avail
        self.available[modality][rows] = avail

    def retrieve(self, modality: str, queries: Tensor, k: Optional[int], threshold: Optional[float] = None,
                 weighting: str = "mean", exclude_ids: Optional[Tensor] = None, temperature: float = 0.1,
                 fallback_mask: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Tensor]]:
        """This rank's queries (nq, d) → (R (nq, d), {"fallback": (nq,) bool}); the ``MemoryBank.retrieve`` rule
        over every rank's rows. A collective."""
        self._check_modality(modality)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "similarity" and self.metric == "l2":
            raise ValueError("weighting='similarity' needs metric 'ip' or 'cosine'")
        temperature = _check_temperature(temperature)
        check_vectors(queries, self.dims[modality], "queries")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive int or None (all available rows), got {k!r}")
        nq_local = queries.shape[0]
        excl = torch.full((nq_local,), -1, dtype=torch.long) if exclude_ids is None else \
            torch.as_tensor(exclude_ids).to(torch.long).reshape(-1)
        if excl.shape != (nq_local,):
            raise ValueError(f"exclude_ids must be ({nq_local},) ids (−1 = none), got {tuple(excl.shape)}")
        fmask = torch.zeros(nq_local, dtype=torch.bool) if fallback_mask is None else fallback_mask
        if tuple(fmask.shape) != (nq_local,) or fmask.dtype != torch.bool:
            raise ValueError(f"fallback_mask must be a bool tensor of shape ({nq_local},)")
        dev = self.device
        q = queries.detach().to(dev, torch.float32)
        sizes = [nq_local]
        if self.world > 1:  # every shard scores every rank's queries
            sizes = _all_sizes(nq_local)
            q = _all_gather_ragged(q, sizes)
            excl = _all_gather_ragged(excl.to(dev).reshape(-1, 1), sizes)[:, 0]
            fmask = _all_gather_ragged(fmask.to(dev, torch.uint8).reshape(-1, 1), sizes)[:, 0].bool()
        excl, fmask = excl.to(dev), fmask.to(dev)
        largest = self.metric != "l2"
        x = self.storage[modality]
        avail = self.available[modality]
        scores = self._scores(q, x)  # (NQ, n_owned)
        candidate = avail[None, :] & (self.owned[None, :] != excl[:, None])
        fill = float("-inf") if largest else float("inf")
        scores = scores.masked_fill(~candidate, fill)
        if k is not None:  # keep the global top-k: local top-k, then the k-th best over all shards as a cut
            kk = min(k, scores.shape[1])
            local_top = scores.topk(kk, dim=1, largest=largest).values if kk else scores[:, :0]
            pad = torch.full((scores.shape[0], k - kk), fill, device=dev)
            local_top = torch.cat([local_top, pad], dim=1)
            everyone = local_top if self.world == 1 else \
                _all_gather_ragged(local_top[None], [1] * self.world).permute(1, 0, 2).reshape(len(q), -1)
            kth = everyone.topk(k, dim=1, largest=largest).values[:, -1:]
            candidate &= (scores >= kth) if largest else (scores <= kth)
            # ties at the k-th score could admit more than k rows; random float scores make that a measure-zero case
        valid = candidate & torch.isfinite(scores)
        if threshold is not None:
            valid &= (scores <= threshold) if self.metric == "l2" else (scores >= threshold)
        if weighting == "mean":
            w = valid.float()
        elif weighting == "similarity":
            w = scores.clamp_min(0).masked_fill(~valid, 0.0)
        else:
            logits = ((-scores if self.metric == "l2" else scores) / temperature).masked_fill(~valid, float("-inf"))
            top = logits.amax(dim=1, keepdim=True)
            if self.world > 1:
                top = _all_reduce(top, torch.distributed.ReduceOp.MAX)
            w = torch.exp(logits - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        num, den = w @ x, w.sum(dim=1, keepdim=True)
        count = valid.sum(dim=1, keepdim=True).float()
        nonzero = avail & (x.sum(dim=1) != 0)
        fb_sum, fb_n = x[nonzero].sum(dim=0, keepdim=True), nonzero.sum().reshape(1, 1).float()
        if self.world > 1:
            packed = _all_reduce(torch.cat([num, den, count], dim=1))
            num, den, count = packed[:, :-2], packed[:, -2:-1], packed[:, -1:]
            fb = _all_reduce(torch.cat([fb_sum, fb_n], dim=1))
            fb_sum, fb_n = fb[:, :-1], fb[:, -1:]
        fallback_vec = fb_sum / fb_n.clamp_min(1)
        fallback = (count[:, 0] == 0) | fmask
        r = torch.where(fallback[:, None], fallback_vec, num / den.clamp_min(1e-12))
        mine = _offset(sizes) if self.world > 1 else slice(0, nq_local)
        return r[mine].to(device=queries.device, dtype=queries.dtype), {"fallback": fallback[mine]}

    def _scores(self, q: Tensor, x: Tensor) -> Tensor:
        if self.metric == "cosine":
            return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
        if self.metric == "ip":
            return q @ x.T
        return ((q * q).sum(1, keepdim=True) + (x * x).sum(1)[None, :] - 2 * q @ x.T).clamp_min(0)

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; bank has {self.modalities}")
