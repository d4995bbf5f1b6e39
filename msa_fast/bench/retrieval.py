"""Retrieval: memory-bank top-k (brute force vs routed exact vs IVF, recall@10), DashFusion partners, HME in-batch.

Bank: cosine top-10 with torch brute force, the routed exact ``Index`` and IVF-Flat / IVF-PQ (train, refresh and
search cost, recall@10 against brute force). Partners: DashFusion's label-aware partner pools, vectorised vs the
official loop. In-batch: HME's in-batch retrieval op vs the official per-row loop.

Small sizes by default (seconds); ``--full`` (or env MSA_FAST_BENCH_FULL=1) runs the issue's sizes: N = 10⁴, 10⁵, 10⁶
bank rows, 1 024 queries, d = 192, clustered data; partners at N = 1 284 (MOSI) and 16 326 (MOSEI). The official
partner loop is O(N²) Python: it is timed on ``--loop-rows`` anchors and extrapolated linearly to all N rows.
Timings on a shared machine are noisy: compare ratios, and re-run when the load is low.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Callable

from . import format_table

if TYPE_CHECKING:  # torch is imported inside the functions: ``msa-fast bench retrieval --help`` must not pay for it
    import torch

TOPK = 10
#: The benchmark sections ``--skip`` can leave out.
SECTIONS = ("bank", "partners", "in_batch")


def clustered(n: int, d: int, seed: int = 0, clusters: int = 1000, noise: float = 0.5) -> torch.Tensor:
    """Gaussian clusters (centres ~ N(0, I), per-point noise ``noise``·N(0, I)): the regime where IVF pays off."""
    import torch

    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(min(clusters, n), d, generator=g)
    out = torch.empty(n, d)
    for s in range(0, n, 1 << 18):  # chunked to bound the temporary
        e = min(s + (1 << 18), n)
        out[s:e] = centers[torch.randint(0, len(centers), (e - s,), generator=g)]
        out[s:e] += noise * torch.randn(e - s, d, generator=g)
    return out


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time of ``repeat`` calls (seconds) and the last result."""
    best, res = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t0)
    return best, res


def recall_at(ids: torch.Tensor, ref: torch.Tensor) -> float:
    hits = (ids[:, :, None] == ref[:, None, :]).any(-1).sum().item()
    return hits / ref.numel()


def torch_brute_force(x: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Plain top-k on one (nq, N) score matrix of pre-normalised rows (the baseline the issue measured)."""
    import torch

    return torch.cat([(qc @ x.T).topk(k, dim=1).indices for qc in q.split(256)])  # 256-query chunks: ≤ 1 GB


def bench_bank(n: int, d: int, nq: int, nlist: int, nprobes: list[int], train_size: int, seed: int = 0) -> list[dict]:
    """Bank-style cosine top-10: torch brute force, routed exact ``Index``, IVF-Flat (train / refresh / search)."""
    import torch

    from ..retrieval import Index, faiss_or_none

    x = torch.nn.functional.normalize(clustered(n + nq, d, seed), dim=1)
    x, q = x[:n], x[n:]  # queries: new points from the same clusters
    rows = []
    t_bf, ref = timed(lambda: torch_brute_force(x, q, TOPK))
    rows.append(dict(bench="bank", N=n, method="torch matmul+topk", s=t_bf, speedup=1.0, recall10=1.0, note=""))
    exact = Index(d, metric="cosine")
    exact.add(x)
    t_ex, (_, ids) = timed(lambda: exact.search(q, TOPK), repeat=2)
    rows.append(dict(bench="bank", N=n, method="Index flat (routed)", s=t_ex, speedup=t_bf / t_ex,
                     recall10=recall_at(ids, ref), note=f"engine={_engine(exact)}"))
    if faiss_or_none() is None:
        return rows
    ivf = Index(d, metric="cosine", kind="ivf_flat", nlist=nlist, train_size=min(train_size, n))
    t_add0, _ = timed(lambda: ivf.add(x))
    t_train, _ = timed(ivf.train)
    rows.append(dict(bench="bank", N=n, method=f"IVF{nlist},Flat train", s=t_train, speedup=None, recall10=None,
                     note=f"{min(train_size, n)} points"))

    def refresh():
        ivf.reset()
        ivf.add(x, torch.arange(n))
    t_ref, _ = timed(refresh)
    rows.append(dict(bench="bank", N=n, method="IVF refresh (reset+re-add)", s=t_ref, speedup=None, recall10=None,
                     note="per epoch, no re-training"))
    for nprobe in nprobes:
        ivf.nprobe = nprobe
        t, (_, ids) = timed(lambda: ivf.search(q, TOPK), repeat=2)
        rows.append(dict(bench="bank", N=n, method=f"IVF{nlist},Flat nprobe={nprobe}", s=t, speedup=t_bf / t,
                         recall10=recall_at(ids, ref), note=""))
    # IVF-PQ (codes of d/4 bytes instead of 4·d): compressed ranking alone vs re-ranked with exact scores
    pq = Index(d, metric="cosine", kind="ivf_pq", nlist=nlist, train_size=min(train_size, n), nprobe=nprobes[-1])
    pq.add(x)
    pq.train()
    for refine in (1, 4):
        pq.refine = refine
        t, (_, ids) = timed(lambda: pq.search(q, TOPK), repeat=2)
        rows.append(dict(bench="bank", N=n, method=f"IVF{nlist},PQ{pq.pq_m} nprobe={nprobes[-1]} refine={refine}",
                         s=t, speedup=t_bf / t, recall10=recall_at(ids, ref), note=""))
    return rows


def _engine(index) -> str:
    from ..retrieval import index as index_mod

    key = (index.device.type, index.metric, index.dim)
    return index_mod._ENGINE_CACHE.get(key, "torch (N < calibration size)") if index.exact_engine == "auto" \
        else index.exact_engine


def bench_partners(n: int, loop_rows: int, f: int = 384, seed: int = 0, windows=(1.0, 1.0)) -> list[dict]:
    """Label-aware partner pools: vectorised vs the official per-row loop (subset, extrapolated)."""
    import torch

    from ..retrieval import label_aware_partners, official_partner_loop

    g = torch.Generator().manual_seed(seed)
    feats = clustered(n, f, seed, clusters=50, noise=1.0)
    labels = torch.round(torch.randn(n, generator=g).clamp(-3, 3) * 1.2)
    rows = []
    for bug in (False, True):
        t, pools = timed(lambda: label_aware_partners(feats, labels, k=10, rank_index_bug=bug,
                                                      window_top=windows[0], window_bottom=windows[1]))
        sub = torch.arange(min(loop_rows, n))
        t_loop, ref = timed(lambda: official_partner_loop(feats, labels, k=10, rank_index_bug=bug,
                                                          window_top=windows[0], window_bottom=windows[1],
                                                          rows=sub))
        est = t_loop * n / len(sub)
        same = all(torch.equal(pools[k_][sub], ref[k_][sub]) for k_ in ("ss", "sd", "dd"))
        rows.append(dict(bench="partners", N=n, method=f"vectorised rank_index_bug={bug}", s=t, speedup=est / t,
                         recall10=None, note=f"official loop ≈ {est:.1f} s (from {len(sub)} rows); equal={same}"))
    return rows


def bench_in_batch(b: int = 256, d: int = 192, seed: int = 0) -> list[dict]:
    """HME in-batch retrieval: official per-row loop vs the op (torch backend; triton on CUDA)."""
    import torch

    from ..retrieval import in_batch_retrieve, official_loop_retrieve

    h = clustered(b, d, seed, clusters=8, noise=0.8)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    h = h.to(dev)
    t_loop, ref = timed(lambda: official_loop_retrieve(h), repeat=3)
    rows = [dict(bench="hme_in_batch", N=b, method="official loop", s=t_loop, speedup=1.0, recall10=None, note=dev)]
    backends = ["torch"] + (["triton"] if dev == "cuda" else [])
    for be in backends:
        t, (r, _) = timed(lambda: in_batch_retrieve(h, backend=be), repeat=3)
        err = (r - ref).abs().max().item()
        rows.append(dict(bench="hme_in_batch", N=b, method=f"in_batch_retrieve[{be}]", s=t, speedup=t_loop / t,
                         recall10=None, note=f"max|Δ|={err:.1e}"))
    return rows


#: ``--smoke``: a 2 000-row bank, 64 queries, one probe count, a 256-row partner case.
SMOKE = {"full": False, "sizes": [2000], "queries": 64, "nprobe": [4], "train_size": 2000, "partner_sizes": [256],
         "loop_rows": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="the issue's sizes (N up to 10^6; minutes; also MSA_FAST_BENCH_FULL=1)")
    parser.add_argument("--sizes", type=int, nargs="*", metavar="N",
                        help="bank sizes N (default 10^4; --full 10^4 10^5 10^6)")
    parser.add_argument("--queries", type=int, default=None, help="queries per search (default 256; --full 1024)")
    parser.add_argument("--dim", type=int, default=192, help="feature dimension of the bank rows (default 192)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default ≈ 4·√N, ≤ 1024)")
    parser.add_argument("--nprobe", type=int, nargs="*", default=[4, 8, 16], metavar="P",
                        help="IVF lists probed per query, one row each (default 4 8 16)")
    parser.add_argument("--train-size", type=int, default=65536, help="IVF training sample (default 65536)")
    parser.add_argument("--partner-sizes", type=int, nargs="*", metavar="N",
                        help="rows of the partner benchmark (default 1284; --full 1284 16326)")
    parser.add_argument("--loop-rows", type=int, default=64,
                        help="anchors timed for the official partner loop, extrapolated to N (default 64)")
    parser.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, metavar="SECTION",
                        help=f"sections to leave out: {' '.join(SECTIONS)} (default: run all)")


def run(args: argparse.Namespace) -> list[dict]:
    full = args.full or os.environ.get("MSA_FAST_BENCH_FULL") == "1"
    sizes = args.sizes or ([10_000, 100_000, 1_000_000] if full else [10_000])
    nq = args.queries or (1024 if full else 256)
    rows: list[dict] = []
    if "bank" not in args.skip:
        for n in sizes:
            nlist = args.nlist or min(1024, 1 << max(4, round(4 * n ** 0.5).bit_length() - 1))
            rows += bench_bank(n, args.dim, nq, nlist, args.nprobe, args.train_size)
    if "partners" not in args.skip:
        for n in args.partner_sizes or ([1284, 16326] if full else [1284]):
            windows = (1.0, 1.0) if n < 5000 else (1 / 2, 1 / 8)  # MOSI / MOSEI official scan windows
            rows += bench_partners(n, args.loop_rows, windows=windows)
    if "in_batch" not in args.skip:
        rows += bench_in_batch()
    return rows


def main(args: argparse.Namespace) -> int:
    import torch

    print(f"torch threads: {torch.get_num_threads()} (shared machine: timings are noisy)")
    print(format_table(run(args)))
    return 0
