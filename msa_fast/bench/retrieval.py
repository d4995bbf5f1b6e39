"""Retrieval: memory-bank top-k (exact vs IVF at a recall target, per data law), DashFusion partners, HME in-batch.

Bank: cosine top-10 with the exact ``Index`` vs IVF with the ``Index`` defaults plus ``target_recall=0.95`` (nprobe
calibrated at build time on held-out stored vectors), on three data laws — ``clustered`` (1 000 tight, well
separated clusters: IVF's easy regime), ``loose`` (100 wide, overlapping clusters) and ``isotropic`` (Gaussian);
queries are fresh draws of the law. One row per (law, N): exact time, IVF time at the calibrated nprobe, speed-up,
recall@10 on the queries (and at the default nprobe 16), the calibrated nprobe, build time (train + add +
calibration), and which search is the better choice (exact when IVF is slower or the target is unreachable).
Partners: DashFusion's label-aware partner pools, vectorised vs the official loop. In-batch: HME's in-batch
retrieval op vs the official per-row loop.

Small sizes by default (seconds); ``--full`` (or env MSA_FAST_BENCH_FULL=1) runs the issue's sizes: N = 10⁴, 10⁵, 10⁶
bank rows, 1 024 queries, d = 192, each law; partners at N = 1 284 (MOSI) and 16 326 (MOSEI). The official
partner loop is O(N²) Python: it is timed on ``--loop-rows`` anchors and extrapolated linearly to all N rows.
Timings on a shared machine are noisy: compare ratios, and re-run when the load is low.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import TYPE_CHECKING, Callable

from . import format_table, write_outputs

if TYPE_CHECKING:  # torch is imported inside the functions: ``msa-fast bench retrieval --help`` must not pay for it
    import torch

TOPK = 10
#: Data laws of the bank benchmark: ``clustered`` (1 000 tight, well separated Gaussian clusters, the easy regime
#: for IVF), ``loose`` (100 wide overlapping clusters: noise 2× the centre spread) and ``isotropic`` (N(0, I)).
LAWS = ("clustered", "loose", "isotropic")
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


def sample_law(law: str, n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n rows of a data law (see ``LAWS``), L2-normalised (cosine bank). Database and queries come from one call and
    are split, so queries are new draws of the law, never copies of database rows."""
    import torch

    if law == "clustered":
        x = clustered(n, d, seed)
    elif law == "loose":
        x = clustered(n, d, seed, clusters=100, noise=2.0)
    elif law == "isotropic":
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"unknown data law {law!r}; choose from {LAWS}")
    return torch.nn.functional.normalize(x, dim=1)


def bench_bank(n: int, d: int, nq: int, law: str = "clustered", kind: str = "ivf_flat", target: float = 0.95,
               nlist: int | None = None, train_size: int | None = None, seed: int = 0) -> list[dict]:
    """One case (law, N): exact ``Index`` vs IVF with the ``Index`` defaults (nprobe 16) and with
    ``target_recall=target`` (nprobe calibrated at build time); recall@10 measured against the exact results on
    ``nq`` fresh queries of the law. One row."""
    import torch

    from ..retrieval import Index, faiss_or_none

    if faiss_or_none() is None:  # no IVF without FAISS: nothing to compare
        return [dict(bench="bank", law=law, N=n, method=f"{kind} (faiss not installed: skipped)")]
    x = sample_law(law, n + nq, d, seed)
    x, q = x[:n], x[n:]
    exact = Index(d, metric="cosine")
    exact.add(x)
    repeat = 5 if n <= 20_000 else 2 if n <= 200_000 else 1  # best of: tiny cases are noise-dominated
    t_ex, (_, ref) = timed(lambda: exact.search(q, TOPK), repeat=repeat)
    ivf = Index(d, metric="cosine", kind=kind, nlist=nlist, train_size=train_size, target_recall=target)
    default_nprobe = ivf.nprobe

    def build():
        ivf.add(x)
        ivf.train()  # trains, adds, then calibrates nprobe on 512 held-out stored vectors
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t_build, _ = timed(build)
    cal = ivf.calibrated
    calibrated = (ivf.nprobe, ivf.refine)
    ivf.nprobe = default_nprobe  # the defaults alone, for comparison
    if kind == "ivf_pq":
        ivf.refine = 4
    _, (_, ids) = timed(lambda: ivf.search(q, TOPK))
    recall_default = recall_at(ids, ref)
    ivf.nprobe, ivf.refine = calibrated
    t_ivf, (_, ids) = timed(lambda: ivf.search(q, TOPK), repeat=repeat)
    recall = recall_at(ids, ref)
    speedup = t_ex / t_ivf
    every = ivf.nprobe >= (ivf.nlist or 1) > 1  # the target needs every list: a full scan
    if cal is None or not cal["reached"]:
        verdict = f"exact (target {target} unreachable)"
    elif speedup < 1 or every:
        verdict = "exact (" + ", ".join(["IVF slower"] * (speedup < 1) + ["every list scanned"] * every) + ")"
    else:
        verdict = "IVF"
    label = "Flat" if kind == "ivf_flat" else f"PQ{ivf.pq_m} refine={ivf.refine}"
    note = f"exact engine={_engine(exact)}" + (f"; calibration {cal['seconds']:.2f} s" if cal else "")
    if caught:
        note += "; warned: " + "; ".join(str(w.message).split(":")[0] for w in caught)
    return [dict(bench="bank", law=law, N=n, method=f"IVF{ivf.nlist},{label} target={target}", exact_s=t_ex,
                 s=t_ivf, speedup=speedup, recall10=recall, nprobe=ivf.nprobe,
                 calib_recall=cal["recall"] if cal else None, recall10_nprobe16=recall_default, build_s=t_build,
                 better=verdict, note=note)]


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


#: ``--smoke``: a 2 000-row bank per law, 64 queries, a 256-row partner case.
SMOKE = {"full": False, "sizes": [2000], "queries": 64, "partner_sizes": [256], "loop_rows": 8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="the issue's sizes (N up to 10^6; minutes; also MSA_FAST_BENCH_FULL=1)")
    parser.add_argument("--sizes", type=int, nargs="*", metavar="N",
                        help="bank sizes N (default 10^4; --full 10^4 10^5 10^6)")
    parser.add_argument("--queries", type=int, default=None, help="queries per search (default 256; --full 1024)")
    parser.add_argument("--dim", type=int, default=192, help="feature dimension of the bank rows (default 192)")
    parser.add_argument("--laws", nargs="*", default=list(LAWS), choices=LAWS, metavar="LAW",
                        help=f"data laws of the bank: {' '.join(LAWS)} (default: all)")
    parser.add_argument("--kinds", nargs="*", default=["ivf_flat"], choices=("ivf_flat", "ivf_pq"), metavar="KIND",
                        help="IVF kinds: ivf_flat ivf_pq (default ivf_flat)")
    parser.add_argument("--target-recall", type=float, default=0.95,
                        help="Index(target_recall=...): recall@10 the IVF nprobe is calibrated for (default 0.95)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: the Index default, ≈ 4·√N)")
    parser.add_argument("--train-size", type=int, default=None,
                        help="IVF training sample (default: the Index default, min(N, 64·nlist))")
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
            for law in args.laws:
                for kind in args.kinds:
                    rows += bench_bank(n, args.dim, nq, law, kind, args.target_recall, args.nlist, args.train_size)
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
    rows = run(args)
    print(format_table(rows))
    write_outputs(args, rows)  # --json / --csv / --plot (shared: msa_fast.bench.write_outputs)
    return 0
