"""``Index``: k-nearest-neighbour search over id-tagged vectors, torch tensors in and out, FAISS underneath.

* metrics: "ip" (inner product, larger = closer), "cosine" (vectors and queries L2-normalised, then ip), "l2"
  (**squared** Euclidean distance, smaller = closer);
* kinds: "flat" (exact) and the approximate "ivf_flat" / "ivf_pq" (FAISS ``IndexIVFFlat`` / ``IndexIVFPQ``);
* engines: the exact search runs either as tiled torch GEMM + top-k or through FAISS (``IndexFlat`` on CPU,
  ``knn_gpu`` on GPU); ``exact_engine="auto"`` times both once per (device, metric, dim) on a sample and keeps the
  faster, so the exact path is never slower than torch brute force; without FAISS everything is exact torch (an IVF
  kind then warns once and searches exactly);
* GPU: a FAISS GPU index is used when ``faiss.get_num_gpus() > 0`` and the index device is CUDA; the IVF master copy
  stays on the CPU and a GPU clone is refreshed lazily. Requests beyond FAISS's GPU selection limit (k or nprobe >
  2048) go to the CPU master (IVF) or to torch (flat);
* ids: int64 ≥ 0, given or assigned consecutively; ``exclude_ids`` drops one id per query (self-exclusion by id, not
  by position); ``add`` / ``remove`` / ``update`` by id; a trained IVF keeps its coarse quantizer across ``reset()`` so
  per-epoch refreshes re-add vectors without re-training;
* ``devices=[...]``: one shard per device (sample with id i lives on shard i mod S), same API, results merged;
* ``target_recall=r`` (IVF kinds): instead of the raw ``nprobe`` / ``refine`` knobs, ask for a recall@k (k =
  ``calibration_k``, default 10). When the IVF is trained (``train()``, or lazily before the first approximate
  search) a seeded sample of ``calibration_queries`` (default 512) stored vectors is searched with their own id
  excluded (a stored vector trivially finds itself; without it, its k true neighbours are the other stored vectors).
  When ``train()`` samples the stored vectors these queries are also held out of the k-means / PQ training sample
  (if the rest still holds the training sample, or FAISS's 39 points per list), so they are as unseen as fresh
  queries of the same law. Exact ground truth comes from the exact engine; nprobe runs through the powers of two up
  to nlist (IVF-PQ: for the first nprobe whose recall with refine = 32 reaches r, the smallest power-of-two refine
  that does) until recall@k ≥ r. The setting found replaces ``nprobe`` (and ``refine``), and ``index.calibrated``
  holds ``{"nprobe", "refine", "recall", "stderr", "queries", "k", "target", "reached", "source", "seconds"}``
  (stderr: standard error of the estimate over the calibration queries, ≈ 0.005–0.01 near r = 0.95 with 512 of them,
  so an independent measurement may land a little below r). If even nprobe = nlist misses r, the best setting tried
  is kept and a warning names the recall reached and suggests ``kind="flat"`` (exact search is then the better
  choice anyway); a target reached only at nprobe = nlist (every list scanned: isotropic data) warns likewise. The
  estimate holds for queries distributed like the stored vectors (without the hold-out — small N, ``train(x)``, a
  calibration after the data changed — the sample may include training vectors: slightly optimistic at small N); for
  queries from another distribution call ``calibrate(queries)``. Re-training re-calibrates; ``add`` / ``remove`` /
  ``reset`` (epoch refreshes) keep the setting — call ``calibrate()`` after a large change of the data; ``save`` /
  ``load`` keep it. Exact kinds (flat, or an IVF kind without FAISS) have recall 1.0 by construction: ``calibrated``
  says so at once. With ``devices=[...]`` the calibration searches all shards (one nprobe for every shard);
* ``save`` / ``load``: one ``torch.save`` file (vectors, ids, the trained empty FAISS index as bytes), loadable with
  ``weights_only=True``; ``save`` writes a temporary file in the target's folder and renames it over the target
  (atomic: a failed save never leaves a truncated index), and an unwritable target raises an ``OSError`` naming it.

Empty result slots (fewer than k candidates after an exclusion) hold id −1 and score −inf (ip/cosine) or +inf (l2).
"""
from __future__ import annotations

import errno
import math
import os
import time
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._atomic import atomic_torch_save

METRICS = ("ip", "cosine", "l2")
KINDS = ("flat", "ivf_flat", "ivf_pq")
BACKENDS = ("auto", "faiss", "torch")
EXACT_ENGINES = ("auto", "torch", "faiss")
GPU_MAX_K = 2048  # FAISS GPU_MAX_SELECTION_K without cuVS (also bounds IVF nprobe on GPU)
_SCORE_BUDGET = 1 << 25  # fp32 score elements per torch tile (128 MiB)
_CALIBRATE_MIN_N = 50_000  # below this the engines differ by milliseconds: use torch without timing
_ENGINE_CACHE: dict[tuple, str] = {}
_MAX_REFINE = 32  # IVF-PQ calibration: largest refine tried (refine·k candidates re-ranked exactly)
_WARNED: set[str] = set()

DeviceLike = Union[str, torch.device]


def faiss_or_none() -> Any:
    """The ``faiss`` module, or None when it is not installed (torch must be imported first: OpenMP clash)."""
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return None
    return faiss


def faiss_gpus() -> int:
    faiss = faiss_or_none()
    return faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0


def check_vectors(x: Tensor, dim: int, name: str) -> None:
    """(n, dim) finite floating tensor, else a ValueError/TypeError naming ``name``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{name} must have shape (n, {dim}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def merge_topk(scores: Sequence[Tensor], ids: Sequence[Tensor], k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Merge per-part top-k lists (nq, k_i) into one (nq, k) list, best first."""
    s = torch.cat(list(scores), dim=1)
    i = torch.cat(list(ids), dim=1)
    kk = min(k, s.shape[1])
    top, pos = s.topk(kk, dim=1, largest=largest)
    return _pad(top, i.gather(1, pos), k, largest)


def _pad(scores: Tensor, ids: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    missing = k - scores.shape[1]
    if missing <= 0:
        return scores, ids
    fill = float("-inf") if largest else float("inf")
    return F.pad(scores, (0, missing), value=fill), F.pad(ids, (0, missing), value=-1)


class _Shard:
    """One device's vectors + ids (torch) and, for IVF / FAISS-flat, the FAISS structures."""

    def __init__(self, owner: "Index", device: torch.device):
        self.o = owner
        self.device = device
        self.x = torch.empty((0, owner.dim), dtype=torch.float32, device=device)
        self.ids = torch.empty((0,), dtype=torch.long, device=device)
        self.ivf: Any = None  # CPU master IVF index (ids = our ids)
        self._ivf_gpu: Any = None
        self._flat: Any = None  # lazily built FAISS flat index over self.x (ids = row positions)
        self._order: Optional[tuple[Tensor, Tensor]] = None  # sorted ids + positions (IVF-PQ exact re-rank)
        self._gpu_res: Any = None

    # -- storage ---------------------------------------------------------------------------------------------
    def add(self, x: Tensor, ids: Tensor) -> None:
        self.x = torch.cat([self.x, x.to(self.device)])
        self.ids = torch.cat([self.ids, ids.to(self.device)])
        if self.ivf is not None and self.ivf.is_trained:
            self.ivf.add_with_ids(_np(x), _np(ids))
        self._invalidate()

    def remove(self, ids: Tensor) -> None:
        keep = ~torch.isin(self.ids, ids.to(self.device))
        self.x, self.ids = self.x[keep], self.ids[keep]
        if self.ivf is not None and self.ivf.is_trained:
            self.ivf.remove_ids(_np(ids))
        self._invalidate()

    def reset(self) -> None:
        self.x, self.ids = self.x[:0], self.ids[:0]
        if self.ivf is not None:
            self.ivf.reset()  # keeps the trained coarse quantizer (and PQ codebooks)
        self._invalidate()

    def _invalidate(self) -> None:
        self._order = None
        self._flat = None
        self._ivf_gpu = None

    # -- IVF -------------------------------------------------------------------------------------------------
    def make_ivf(self, faiss: Any, nlist: int) -> Any:
        o = self.o
        metric = faiss.METRIC_L2 if o.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        quantizer = faiss.IndexFlatL2(o.dim) if o.metric == "l2" else faiss.IndexFlatIP(o.dim)
        if o.kind == "ivf_flat":
            ivf = faiss.IndexIVFFlat(quantizer, o.dim, nlist, metric)
        else:
            ivf = faiss.IndexIVFPQ(quantizer, o.dim, nlist, o.pq_m, o.pq_nbits, metric)
        ivf.cp.seed = o.seed
        return ivf

    def train(self, sample: Tensor, nlist: int) -> None:
        faiss = faiss_or_none()
        self.ivf = self.make_ivf(faiss, nlist)
        self.ivf.train(_np(sample))
        if len(self.ids):
            self.ivf.add_with_ids(_np(self.x), _np(self.ids))
        self._invalidate()

    def adopt_trained(self, trained_empty: Any) -> None:
        faiss = faiss_or_none()
        self.ivf = faiss.clone_index(trained_empty)
        self.ivf.reset()
        if len(self.ids):
            self.ivf.add_with_ids(_np(self.x), _np(self.ids))
        self._invalidate()

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, q: Tensor, k: int, approximate: bool) -> tuple[Tensor, Tensor]:
        """q already normalised for cosine, on any device → (scores, ids) (nq, ≤k) on q.device."""
        k = min(k, len(self.ids))
        if approximate and self.ivf is not None:
            refine = self.o.refine if self.o.kind == "ivf_pq" else 1
            s, i = self._search_ivf(q, min(len(self.ids), k * refine))
            if refine > 1:
                s, i = self._rerank_exact(q, i, k)
            s = s.masked_fill(i < 0, float("-inf") if self.o.metric != "l2" else float("inf"))  # lists ran dry
        else:
            s, pos = self._search_exact(q, k)
            i = self.ids.to(pos.device)[pos.clamp_min(0)].masked_fill(pos < 0, -1)
        return s.to(q.device), i.to(q.device)

    def _search_ivf(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        o = self.o
        use_gpu = self.device.type == "cuda" and faiss_gpus() > 0 and k <= GPU_MAX_K and o.nprobe <= GPU_MAX_K
        if use_gpu:
            faiss = faiss_or_none()
            import faiss.contrib.torch_utils  # noqa: F401  (zero-copy CUDA tensors)
            if self._ivf_gpu is None:
                self._gpu_res = self._gpu_res or _gpu_resources(faiss)
                self._ivf_gpu = faiss.index_cpu_to_gpu(self._gpu_res, self.device.index or 0, self.ivf)
            self._ivf_gpu.nprobe = o.nprobe
            d, i = self._ivf_gpu.search(q.to(self.device, torch.float32).contiguous(), k)
            return d, i
        self.ivf.nprobe = o.nprobe
        d, i = self.ivf.search(_np(q), k)
        return torch.from_numpy(d), torch.from_numpy(i)

    def _rerank_exact(self, q: Tensor, cand: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact scores of the candidate ids cand (nq, kk) (−1 = none) → the best k (scores, ids)."""
        if self._order is None:  # id → row position via a sorted copy of the ids
            self._order = torch.sort(self.ids)
        sorted_ids, perm = self._order
        cand = cand.to(self.ids.device)
        loc = torch.searchsorted(sorted_ids, cand.clamp_min(0)).clamp_max(len(sorted_ids) - 1)
        found = (cand >= 0) & (sorted_ids[loc] == cand)
        rows = self.x[perm[loc]]  # (nq, kk, dim)
        qd = q.to(self.x.device, torch.float32)
        largest = self.o.metric != "l2"
        if largest:
            s = (rows @ qd[:, :, None]).squeeze(-1)
        else:
            s = ((rows - qd[:, None, :]) ** 2).sum(-1)
        s = s.masked_fill(~found, float("-inf") if largest else float("inf"))
        top, pos = s.topk(min(k, s.shape[1]), dim=1, largest=largest)
        return top, torch.where(torch.isfinite(top), cand.gather(1, pos), torch.full_like(pos, -1))

    def _search_exact(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        engine = self.o._exact_engine_for(self, q, k)
        if engine == "faiss":
            return self._search_faiss_flat(q, k)
        return self._search_torch(q, k)

    def _search_torch(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Tiled GEMM + top-k, merged across database chunks (bounded memory). → (scores, row positions)."""
        q = q.to(self.device, torch.float32)
        x = self.x
        largest = self.o.metric != "l2"
        chunk = max(k, _SCORE_BUDGET // max(q.shape[0], 1))
        best_s: Optional[Tensor] = None
        best_i: Optional[Tensor] = None
        q_sq = (q * q).sum(1, keepdim=True) if not largest else None
        for start in range(0, x.shape[0], chunk):
            xc = x[start:start + chunk]
            s = q @ xc.T
            if not largest:  # squared L2 = ‖q‖² + ‖x‖² − 2 q·x (clamped at 0 like an exact distance)
                s = (q_sq + (xc * xc).sum(1)[None, :] - 2 * s).clamp_min_(0)
            top, pos = s.topk(min(k, xc.shape[0]), dim=1, largest=largest)
            pos = pos + start
            if best_s is None:
                best_s, best_i = top, pos
            else:
                best_s, best_i = merge_topk([best_s, top], [best_i, pos], k, largest)
        assert best_s is not None and best_i is not None
        return best_s, best_i

    def _search_faiss_flat(self, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
        faiss = faiss_or_none()
        metric = faiss.METRIC_L2 if self.o.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.device.type == "cuda" and faiss_gpus() > 0:
            import faiss.contrib.torch_utils  # noqa: F401
            self._gpu_res = self._gpu_res or _gpu_resources(faiss)
            d, i = faiss.knn_gpu(self._gpu_res, q.to(self.device, torch.float32).contiguous(), self.x, k,
                                 metric=metric, device=self.device.index or 0)
            return d, i
        if self._flat is None:
            self._flat = faiss.IndexFlatL2(self.o.dim) if metric == faiss.METRIC_L2 else faiss.IndexFlatIP(self.o.dim)
            self._flat.add(_np(self.x))
        d, i = self._flat.search(_np(q), k)
        return torch.from_numpy(d), torch.from_numpy(i)


def _np(t: Tensor):
    """Contiguous CPU float32/int64 NumPy view for the FAISS CPU API."""
    t = t.detach().to("cpu")
    t = t.to(torch.long) if not t.is_floating_point() else t.to(torch.float32)
    return t.contiguous().numpy()


def _gpu_resources(faiss: Any) -> Any:
    res = faiss.StandardGpuResources()
    res.setTempMemory(64 << 20)  # do not reserve 1.5 GiB beside PyTorch's caching allocator
    return res


class Index:
    """kNN index over (N, dim) vectors with int64 ids. See the module docstring for semantics.

    Args: dim; metric "ip" | "cosine" | "l2"; kind "flat" | "ivf_flat" | "ivf_pq"; nlist (IVF lists; default from
    N at training: 4·√N rounded to a power of two, ≤ N/39); nprobe (IVF lists visited per query); pq_m / pq_nbits
    (IVF-PQ sub-quantizers, default m = dim/4 or the largest divisor of dim below it, 8 bits); refine (IVF-PQ:
    fetch refine·k candidates from the compressed codes and re-rank them with exact scores against the stored
    vectors, so the returned scores are exact and recall recovers; 1 = off, default 4); train_size (IVF
    training sample, default min(N, 64·nlist), for PQ at least 40·2^nbits); device (where the vectors live);
    devices (several → sharded); backend "auto" | "faiss" | "torch"; exact_engine "auto" | "torch" | "faiss";
    target_recall (0 < r ≤ 1: calibrate nprobe, and refine for IVF-PQ, to reach recall@``calibration_k`` ≥ r on
    ``calibration_queries`` held-out stored vectors; see the module docstring and ``calibrate``). Results come back
    on the queries' device.
    """

    def __init__(self, dim: int, metric: str = "cosine", kind: str = "flat", *, nlist: Optional[int] = None,
                 nprobe: int = 16, pq_m: Optional[int] = None, pq_nbits: int = 8, refine: int = 4,
                 train_size: Optional[int] = None,
                 device: DeviceLike = "cpu", devices: Optional[Sequence[DeviceLike]] = None, backend: str = "auto",
                 exact_engine: str = "auto", seed: int = 0, target_recall: Optional[float] = None,
                 calibration_queries: int = 512, calibration_k: int = 10):
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        for name, val, allowed in (("metric", metric, METRICS), ("kind", kind, KINDS), ("backend", backend, BACKENDS),
                                   ("exact_engine", exact_engine, EXACT_ENGINES)):
            if val not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {val!r}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if not isinstance(refine, int) or refine < 1:
            raise ValueError(f"refine must be an int >= 1, got {refine!r}")
        self.refine = refine
        self.target_recall = _check_target_recall(target_recall)
        for name, val in (("calibration_queries", calibration_queries), ("calibration_k", calibration_k)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        self.calibration_queries, self.calibration_k = calibration_queries, calibration_k
        self.dim, self.metric, self.kind, self.seed = dim, metric, kind, seed
        self.nlist, self.nprobe, self.train_size = nlist, int(nprobe), train_size
        self.pq_m = pq_m or _default_pq_m(dim)
        self.pq_nbits = pq_nbits
        if kind == "ivf_pq" and dim % self.pq_m:
            raise ValueError(f"pq_m={self.pq_m} must divide dim={dim}")
        faiss = faiss_or_none()
        if backend == "faiss" and faiss is None:
            raise ValueError("backend='faiss' but faiss is not installed (pip install faiss-cpu or faiss-gpu)")
        self.backend = "torch" if backend == "torch" or faiss is None else "faiss"
        if kind != "flat" and self.backend == "torch":
            _warn_once("ivf-fallback", f"kind={kind!r} needs faiss; searching exactly with torch instead")
        self.exact_engine = "torch" if self.backend == "torch" else exact_engine
        devs = [torch.device(d) for d in (devices if devices else [device])]
        self.device = devs[0]
        self._shards = [_Shard(self, d) for d in devs]
        self._next_id = 0
        self._calibrating = False
        #: the calibrated setting and the recall it reached (``target_recall`` set), else None; see ``calibrate``
        self.calibrated: Optional[dict] = self._exact_calibration() if not self.approximate else None

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return sum(len(s.ids) for s in self._shards)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def approximate(self) -> bool:
        return self.kind != "flat" and self.backend == "faiss"

    @property
    def is_trained(self) -> bool:
        return not self.approximate or self._shards[0].ivf is not None

    @property
    def ids(self) -> Tensor:
        return torch.cat([s.ids.to(self.device) for s in self._shards])

    # -- mutation --------------------------------------------------------------------------------------------
    def add(self, x: Tensor, ids: Optional[Tensor] = None) -> Tensor:
        """Add x (n, dim); ids (n,) int64 ≥ 0 unique and new (default: consecutive). → the ids used."""
        check_vectors(x, self.dim, "x")
        n = x.shape[0]
        if ids is None:
            ids = torch.arange(self._next_id, self._next_id + n, dtype=torch.long)
        ids = self._check_ids(ids, n, "ids")
        if n and bool(torch.isin(ids, self.ids.cpu()).any()):
            raise ValueError("ids already present in the index (use update() to overwrite)")
        self._next_id = max(self._next_id, int(ids.max()) + 1) if n else self._next_id
        x = self._prepare(x)
        for si, s in enumerate(self._shards):
            sel = (ids % len(self._shards)) == si
            if bool(sel.any()):
                s.add(x[sel.to(x.device)], ids[sel])
        return ids

    def remove(self, ids: Tensor) -> None:
        """Remove the given ids (each must be present)."""
        ids = self._check_ids(ids, None, "ids")
        self._require_present(ids)
        for si, s in enumerate(self._shards):
            sel = ids[(ids % len(self._shards)) == si]
            if len(sel):
                s.remove(sel)

    def update(self, ids: Tensor, x: Tensor) -> None:
        """Overwrite the vectors of existing ids."""
        check_vectors(x, self.dim, "x")
        ids = self._check_ids(ids, x.shape[0], "ids")
        self._require_present(ids)
        self.remove(ids)
        self.add(x, ids)

    def reset(self) -> None:
        """Drop all vectors (ids restart at 0); a trained IVF keeps its quantizer (re-add without re-training)."""
        for s in self._shards:
            s.reset()
        self._next_id = 0

    def train(self, x: Optional[Tensor] = None) -> None:
        """Train the IVF coarse quantizer (and PQ) on x or on a sample of the stored vectors. No-op for flat."""
        if not self.approximate:
            return
        own = x is None
        if x is None:
            x = torch.cat([s.x.cpu() for s in self._shards])
        else:
            check_vectors(x, self.dim, "x")
            x = self._prepare(x).cpu()
        n = x.shape[0]
        nlist = self.nlist or _default_nlist(n)
        if n < nlist:
            raise ValueError(f"IVF training needs at least nlist={nlist} vectors, got {n}")
        if self.kind == "ivf_pq" and n < (1 << self.pq_nbits):
            raise ValueError(f"IVF-PQ training needs at least {1 << self.pq_nbits} vectors, got {n}")
        size = min(n, self.train_size or max(64 * nlist, 40 << self.pq_nbits if self.kind == "ivf_pq" else 0))
        pool = torch.arange(n)
        if own and self.target_recall is not None:  # hold the calibration queries out of the training sample
            m = min(self.calibration_queries, n)
            enough = min(size, 39 * nlist)  # FAISS wants ≥ 39 points per list: do not starve the training
            if n - m >= max(enough, 1 << self.pq_nbits if self.kind == "ivf_pq" else 0):
                keep = torch.ones(n, dtype=torch.bool)
                keep[self._calibration_positions(n, m)] = False
                pool = pool[keep]
                size = min(size, len(pool))
        g = torch.Generator().manual_seed(self.seed)
        sample = x[pool[torch.randperm(len(pool), generator=g)[:size]]] if size < n else x
        self.nlist = nlist
        first = self._shards[0]
        first.train(sample, nlist)
        for s in self._shards[1:]:
            s.adopt_trained(first.ivf)
        self.calibrated = None  # a new quantizer: the old setting no longer applies
        if self.target_recall is not None and self.ntotal >= 2:
            self.calibrate()  # else lazily before the first approximate search

    def calibrate(self, queries: Optional[Tensor] = None) -> dict:
        """Find the cheapest nprobe (IVF-PQ: and refine) whose recall@``calibration_k`` reaches ``target_recall``.

        queries None: a seeded sample of ``calibration_queries`` stored vectors, each searched with its own id
        excluded (leave-one-out: an honest estimate for queries distributed like the stored vectors); or give
        queries (nq, dim) from the distribution you will search with. Ground truth: the exact engine. nprobe runs
        through 1, 2, 4, ... up to nlist; for IVF-PQ, at each nprobe refine = 32 is tried first and, once that
        reaches the target, the smallest power-of-two refine that does. Sets ``nprobe`` / ``refine`` and returns
        (and stores) ``index.calibrated``; if the target is out of reach the best setting is kept and a
        ``UserWarning`` says so. Deterministic for a given ``seed``. Called by ``train()`` (and lazily by the first
        approximate search) when ``target_recall`` is set; call it again after a large change of the data.
        """
        settled = self._settled_calibration(self.train, "Index")
        if settled is not None:
            return settled
        self._calibrating = True
        try:
            return self._calibrate(queries)
        finally:
            self._calibrating = False

    def _settled_calibration(self, train: Callable[[], None], owner: str) -> Optional[dict]:
        """What ``calibrate`` returns without a sweep — the exact kinds' fixed report, or the calibration that
        ``train`` (run here when the IVF is untrained) performed — else None. Raises without a target."""
        if self.target_recall is None:
            raise ValueError(f"calibrate() needs a target: {owner}(..., target_recall=0.95)")
        if not self.approximate:
            self.calibrated = self._exact_calibration()
            return self.calibrated
        if not self.is_trained:
            train()  # calibrates when it can (at least 2 vectors)
            return self.calibrated
        return None

    def _calibrate(self, queries: Optional[Tensor]) -> dict:
        n = self.ntotal
        t0 = time.perf_counter()
        if queries is None:
            if n < 2:
                raise ValueError(f"calibration needs at least 2 stored vectors, got {n}")
            k = min(self.calibration_k, n - 1)
            q, exclude = self._sample_stored(min(self.calibration_queries, n))
            source = "stored vectors, own id excluded"
        else:
            check_vectors(queries, self.dim, "queries")
            if queries.shape[0] == 0 or n == 0:
                raise ValueError("calibration needs at least one query and one stored vector")
            k, q, exclude, source = min(self.calibration_k, n), queries, None, "given queries"
        _, truth = self.search(q, k, exclude_ids=exclude, exact=True)

        def recall_at(nprobe: int, refine: int) -> float:
            self.nprobe, self.refine = nprobe, refine
            return _recall(self.search(q, k, exclude_ids=exclude)[1], truth)

        recall, reached = calibration_sweep(self, recall_at)
        per_query = _recall(self.search(q, k, exclude_ids=exclude)[1], truth, per_query=True)
        stderr = float(per_query.std()) / math.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
        self.calibrated = calibration_report(self, recall, reached, stderr, int(q.shape[0]), k, source, t0)
        return self.calibrated

    def _exact_calibration(self) -> Optional[dict]:
        if self.target_recall is None:
            return None
        return {"nprobe": None, "refine": None, "recall": 1.0, "stderr": 0.0, "queries": 0,
                "k": self.calibration_k,
                "target": float(self.target_recall), "reached": True, "source": "exact search", "seconds": 0.0}

    def _calibration_positions(self, n: int, m: int) -> Tensor:
        """Sorted positions (in shard-concatenation order) of the m calibration queries among n stored vectors."""
        g = torch.Generator().manual_seed(self.seed + 0x5EED)
        return torch.randperm(n, generator=g)[:m].sort().values

    def _sample_stored(self, m: int) -> tuple[Tensor, Tensor]:
        """m stored vectors (seeded, without replacement) and their ids, gathered shard by shard."""
        sizes = [len(s.ids) for s in self._shards]
        pick = self._calibration_positions(sum(sizes), m)
        xs, ids, start = [], [], 0
        for s, size in zip(self._shards, sizes):
            local = pick[(pick >= start) & (pick < start + size)] - start
            start += size
            if len(local):
                xs.append(s.x[local.to(s.device)].to(self.device))
                ids.append(s.ids[local.to(s.device)].to("cpu"))
        return torch.cat(xs), torch.cat(ids)

    # -- search ----------------------------------------------------------------------------------------------
    def search(self, q: Tensor, k: int, exclude_ids: Optional[Tensor] = None,
               exact: bool = False) -> tuple[Tensor, Tensor]:
        """q (nq, dim) → (scores (nq, k) float32, ids (nq, k) int64) on q's device, best first.

        exclude_ids (nq,) int64: drop that id from query i's results (−1 = nothing to drop). exact=True bypasses
        IVF. An untrained IVF is trained on the stored vectors first.
        """
        check_vectors(q, self.dim, "queries")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        n = self.ntotal
        if n == 0:
            raise ValueError("cannot search an empty index (add vectors first)")
        if k > n:
            raise ValueError(f"k={k} exceeds the number of indexed vectors ({n})")
        if exclude_ids is not None:
            if tuple(exclude_ids.shape) != (q.shape[0],) or exclude_ids.is_floating_point():
                raise ValueError(f"exclude_ids must be an int tensor of shape ({q.shape[0]},), "
                                 f"got {tuple(exclude_ids.shape)} {exclude_ids.dtype}")
        if self.approximate and not exact and not self.is_trained:
            self.train()
        if (self.approximate and not exact and self.target_recall is not None and self.calibrated is None
                and not self._calibrating):
            self.calibrate()
        largest = self.metric != "l2"
        kk = min(k + (exclude_ids is not None), n)
        qp = self._prepare(q)
        parts = [s.search(qp, kk, approximate=self.approximate and not exact) for s in self._shards if len(s.ids)]
        scores, ids = merge_topk([p[0] for p in parts], [p[1] for p in parts], kk, largest)
        if exclude_ids is not None:
            scores, ids = _drop_ids(scores, ids, exclude_ids.to(ids.device, torch.long), k, largest)
        scores, ids = _pad(scores[:, :k], ids[:, :k], k, largest)
        return scores.to(torch.float32), ids

    # -- persistence -----------------------------------------------------------------------------------------
    def config(self) -> dict:
        return dict(dim=self.dim, metric=self.metric, kind=self.kind, nlist=self.nlist, nprobe=self.nprobe,
                    pq_m=self.pq_m, pq_nbits=self.pq_nbits, refine=self.refine, train_size=self.train_size,
                    seed=self.seed, target_recall=self.target_recall, calibration_queries=self.calibration_queries,
                    calibration_k=self.calibration_k, calibrated=dict(self.calibrated) if self.calibrated else None,
                    exact_engine=self.exact_engine, backend=self.backend,
                    devices=[str(s.device) for s in self._shards])

    def save(self, path: Union[str, "os.PathLike[str]"]) -> None:
        """One file at ``path``: config, per-shard vectors / ids, the trained empty FAISS index (bytes).

        Atomic: the state goes to a temporary file in the same folder, which then replaces ``path`` (``os.replace``),
        so an interrupted or failed save leaves any previous file intact. A target that cannot be written — its
        folder is missing, is not a folder, or is read-only; ``path`` is a directory; the disk is full — raises an
        ``OSError`` (the errno's subclass: ``FileNotFoundError``, ``NotADirectoryError``, ``PermissionError``,
        ``IsADirectoryError``, ...) whose message names ``path`` and the reason.
        """
        trained = None
        if self.approximate and self.is_trained:
            faiss = faiss_or_none()
            empty = faiss.clone_index(self._shards[0].ivf)
            empty.reset()
            trained = torch.from_numpy(faiss.serialize_index(empty).copy())
        state = {"format": 1, "config": self.config(), "next_id": self._next_id, "trained": trained,
                 "shards": [{"x": s.x.cpu(), "ids": s.ids.cpu()} for s in self._shards]}
        _atomic_torch_save(state, path)

    @classmethod
    def load(cls, path: str, devices: Optional[Sequence[DeviceLike]] = None) -> "Index":
        state = torch.load(path, map_location="cpu", weights_only=True)
        cfg = dict(state["config"])
        saved_devices = cfg.pop("devices")
        backend = cfg.pop("backend")
        calibrated = cfg.pop("calibrated", None)  # older files: no calibration keys
        if backend == "faiss" and faiss_or_none() is None:
            backend = "torch"
        idx = cls(**cfg, backend=backend, devices=list(devices) if devices else saved_devices)
        if len(idx._shards) != len(state["shards"]):
            raise ValueError(f"saved index has {len(state['shards'])} shards, got {len(idx._shards)} devices")
        if state["trained"] is not None and idx.approximate:
            faiss = faiss_or_none()
            trained = faiss.deserialize_index(state["trained"].numpy())
            for s in idx._shards:
                s.adopt_trained(trained)
        for s, st in zip(idx._shards, state["shards"]):
            s.add(st["x"], st["ids"])  # vectors are stored already normalised
        idx._next_id = state["next_id"]
        if idx.approximate and idx.is_trained and calibrated is not None:
            idx.calibrated = calibrated  # nprobe / refine in the config are the calibrated ones
        return idx

    # -- helpers ---------------------------------------------------------------------------------------------
    def _prepare(self, x: Tensor) -> Tensor:
        x = x.detach().to(torch.float32)
        return F.normalize(x, dim=1) if self.metric == "cosine" else x

    def _check_ids(self, ids: Any, n: Optional[int], name: str) -> Tensor:
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.dtype == torch.bool or ids.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
        if n is not None and ids.shape[0] != n:
            raise ValueError(f"{name} must have length {n}, got {ids.shape[0]}")
        ids = ids.to("cpu", torch.long)
        if len(ids) and int(ids.min()) < 0:
            raise ValueError(f"{name} must be >= 0 (−1 marks empty result slots)")
        if len(torch.unique(ids)) != len(ids):
            raise ValueError(f"{name} contains duplicates")
        return ids

    def _require_present(self, ids: Tensor) -> None:
        missing = ~torch.isin(ids, self.ids.cpu())
        if bool(missing.any()):
            raise KeyError(f"ids not in the index: {ids[missing][:10].tolist()}")

    def _exact_engine_for(self, shard: _Shard, q: Tensor, k: int) -> str:
        if self.exact_engine != "auto":
            engine = self.exact_engine
        elif len(shard.ids) < _CALIBRATE_MIN_N:
            engine = "torch"
        else:
            key = (shard.device.type, self.metric, self.dim)
            if key not in _ENGINE_CACHE:
                _ENGINE_CACHE[key] = _calibrate(shard, q)
            engine = _ENGINE_CACHE[key]
        if engine == "faiss" and shard.device.type == "cuda" and k > GPU_MAX_K:
            engine = "torch"  # FAISS GPU k-selection limit
        return engine


def _calibrate(shard: _Shard, q: Tensor) -> str:
    """Time torch GEMM+top-k and FAISS flat once on a sample; the faster wins (ties → torch)."""
    n = min(len(shard.ids), 1 << 17)
    sub = _Shard(shard.o, shard.device)
    sub.x, sub.ids = shard.x[:n], shard.ids[:n]
    qs = q[:256] if q.shape[0] >= 256 else q.repeat(math.ceil(256 / max(q.shape[0], 1)), 1)[:256]
    times = {}
    for engine, fn in (("torch", sub._search_torch), ("faiss", sub._search_faiss_flat)):
        fn(qs[:8], 10)  # warm-up (FAISS flat build, CUDA context)
        _sync(shard.device)
        t0 = time.perf_counter()
        fn(qs, 10)
        _sync(shard.device)
        times[engine] = time.perf_counter() - t0
    return "faiss" if times["faiss"] < 0.9 * times["torch"] else "torch"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drop_ids(scores: Tensor, ids: Tensor, exclude: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor]:
    """Remove ids equal to exclude[i] from row i (by id, wherever they sit) and keep the first k."""
    hit = ids == exclude[:, None]
    fill = float("-inf") if largest else float("inf")
    scores = scores.masked_fill(hit, fill)
    ids = ids.masked_fill(hit, -1)
    # Stable re-sort moves the dropped slot to the end while keeping the order of the others.
    order = (hit.to(torch.int8)).argsort(dim=1, stable=True)
    return scores.gather(1, order)[:, :k], ids.gather(1, order)[:, :k]


def _check_target_recall(r: Any) -> Optional[float]:
    if r is None:
        return None
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1:
        hint = f" (a fraction: {r / 100:g} for {r:g} %)" if isinstance(r, (int, float)) and not isinstance(
            r, bool) and math.isfinite(r) and 1 < r <= 100 else ""
        raise ValueError(f"target_recall must be a number with 0 < target_recall <= 1, got {r!r}{hint}")
    return float(r)


def calibration_sweep(index: "Index", recall_at: Callable[[int, int], float]) -> tuple[float, bool]:
    """The cheapest setting of ``index`` (an IVF kind) whose ``recall_at(nprobe, refine)`` reaches its
    ``target_recall``: nprobe through the powers of two up to nlist; for IVF-PQ, refine = 32 first and, at the first
    nprobe that reaches the target, the smallest power-of-two refine that does. Leaves that setting (or, if none
    reaches the target, the best one tried) in ``index.nprobe`` / ``index.refine``; returns (recall, reached)."""
    target = float(index.target_recall)
    nlist = int(index.nlist or 1)
    probes = [1 << i for i in range(max(nlist - 1, 0).bit_length()) if (1 << i) < nlist] + [nlist]
    pq = index.kind == "ivf_pq"
    refines = [1 << i for i in range(_MAX_REFINE.bit_length()) if (1 << i) <= _MAX_REFINE] if pq else [index.refine]
    best: Optional[tuple[float, int, int]] = None
    reached = False
    for nprobe in probes:
        r = recall_at(nprobe, refines[-1])
        if best is None or r > best[0]:
            best = (r, nprobe, refines[-1])
        if r >= target:
            reached = True
            for refine in refines[:-1]:  # the smallest refine that also reaches the target at this nprobe
                r_small = recall_at(nprobe, refine)
                if r_small >= target:
                    best = (r_small, nprobe, refine)
                    break
            else:
                best = (r, nprobe, refines[-1])
            break
    assert best is not None
    recall, index.nprobe, index.refine = best
    return recall, reached


def calibration_report(index: "Index", recall: float, reached: bool, stderr: float, queries: int, k: int,
                       source: str, t0: float) -> dict:
    """``index.calibrated`` for the setting ``calibration_sweep`` left in ``index``; warns when the target was missed
    or needs every list scanned (exact search is then the better choice)."""
    target, nlist, pq = float(index.target_recall), int(index.nlist or 1), index.kind == "ivf_pq"
    if not reached:
        warnings.warn(
            f"target_recall={target} not reached: the best setting (nprobe={index.nprobe} of nlist={nlist}"
            + (f", refine={index.refine}" if pq else "") + f") reaches recall@{k} = {recall:.3f} on "
            f"{queries} calibration queries. Exact search is the better choice here: use kind='flat' "
            + ("(or a larger pq_m / pq_nbits) " if pq else "") + "or lower target_recall.", UserWarning,
            stacklevel=4)
    elif index.nprobe == nlist and nlist > 1:
        warnings.warn(
            f"target_recall={target} needs nprobe = nlist = {nlist} (recall@{k} = {recall:.3f}): the IVF scans "
            "every list, so exact search (kind='flat') is as accurate and faster; the data has no cluster "
            "structure IVF can use at this target.", UserWarning, stacklevel=4)
    return {"nprobe": index.nprobe, "refine": index.refine if pq else None, "recall": recall, "stderr": stderr,
            "queries": queries, "k": k, "target": target, "reached": reached, "source": source,
            "seconds": time.perf_counter() - t0}


def _hits(ids: Tensor, truth: Tensor) -> Tensor:
    """(nq, k) bool: true neighbour (truth (nq, k), −1 = none) j of query i is among ids (nq, k)."""
    return (truth[:, :, None] == ids[:, None, :].to(truth.device)).any(-1) & (truth >= 0)


def _recall(ids: Tensor, truth: Tensor, per_query: bool = False) -> Any:
    """Share of the true neighbours (truth (nq, k), −1 = none) found among ids (nq, k); per_query: (nq,) shares."""
    valid = truth >= 0
    hits = _hits(ids, truth)
    if per_query:
        return hits.sum(1).double() / valid.sum(1).clamp_min(1).double()
    return hits.sum().item() / max(int(valid.sum().item()), 1)


def _default_nlist(n: int) -> int:
    target = 4 * math.sqrt(max(n, 1))
    nlist = 1 << max(0, round(math.log2(target)))
    return max(1, min(nlist, n // 39 or 1))


def _default_pq_m(dim: int) -> int:
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# saving
def _save_error(path: str, exc: OSError, action: str) -> OSError:
    """An OSError of ``exc``'s errno class whose message names the target ``path`` and why it cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    code = exc.errno
    if code == errno.ENOENT:
        reason = f"its folder {folder!r} does not exist"
    elif code == errno.ENOTDIR:
        blocker = folder
        while blocker and not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        reason = (f"{blocker!r} is a file, not a folder" if blocker and not os.path.isdir(blocker)
                  else f"part of {folder!r} is not a folder")
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"its folder {folder!r} is not writable"
    elif code == errno.EISDIR:
        reason = "it is a directory (pass a file path, e.g. " + repr(os.path.join(path, "index.pt")) + ")"
    elif code == errno.ENOSPC:
        reason = "no space left on the device"
    else:
        reason = exc.strerror or str(exc)
    message = f"cannot save the index to {path!r} ({action}): {reason}"
    return OSError(code, message) if code is not None else OSError(message)


def _atomic_torch_save(obj: Any, path: Union[str, "os.PathLike[str]"]) -> None:
    """``torch.save(obj, path)`` atomically (``msa_fast._atomic``); OSErrors are re-raised naming ``path`` (see
    ``_save_error``). The file gets the usual umask-based mode."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise _save_error(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)), "target check")
    atomic_torch_save(obj, path, on_error=lambda err, action: _save_error(path, err, action))
