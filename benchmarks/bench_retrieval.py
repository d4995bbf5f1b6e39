"""pytest-benchmark suite for retrieval: bank top-k (torch brute force / routed exact Index / IVF with the Index
defaults and with ``target_recall=0.95``) on each data law (clustered / loose / isotropic), IVF refresh, DashFusion
partners (vectorised vs official loop), HME in-batch op (vs official loop).

Tiny sizes by default (CI runs ``pytest benchmarks/ --benchmark-disable`` once); the issue's sizes with env
MSA_FAST_BENCH_FULL=1 (N = 10⁶ bank rows, MOSEI partners: minutes). Recall@10 of the IVF rows (and the calibrated
nprobe) is printed by ``msa-fast bench retrieval``; here it is attached as ``extra_info``. Setup factories come from
``msa_fast.bench.retrieval``.
"""
import os

import pytest
import torch

from msa_fast.bench.retrieval import LAWS, TOPK, clustered, recall_at, sample_law, torch_brute_force
from msa_fast.retrieval import Index, faiss_or_none, in_batch_retrieve, label_aware_partners, official_loop_retrieve
from msa_fast.retrieval.partners import official_partner_loop

FULL = os.environ.get("MSA_FAST_BENCH_FULL") == "1"
BANK_N = 1_000_000 if FULL else 4_000
NQ = 1024 if FULL else 64
DIM = 192
PARTNER_N = 16_326 if FULL else 300


@pytest.fixture(scope="module", params=LAWS)
def bank_data(request):
    """(database, queries, law): queries are fresh draws of the law."""
    x = sample_law(request.param, BANK_N + NQ, DIM, 0)
    return x[:BANK_N], x[BANK_N:], request.param


@pytest.fixture(scope="module")
def reference(bank_data):
    x, q, _ = bank_data
    return torch_brute_force(x, q, TOPK)


def test_bank_torch_brute_force(benchmark, bank_data):
    x, q, law = bank_data
    benchmark.group = f"bank-{law}-N{BANK_N}"
    benchmark(torch_brute_force, x, q, TOPK)


def test_bank_index_exact(benchmark, bank_data, reference):
    x, q, law = bank_data
    idx = Index(DIM, metric="cosine")
    idx.add(x)
    benchmark.group = f"bank-{law}-N{BANK_N}"
    _, ids = benchmark(idx.search, q, TOPK)
    benchmark.extra_info["recall10"] = recall_at(ids, reference)


@pytest.mark.skipif(faiss_or_none() is None, reason="faiss not installed")
@pytest.mark.parametrize("setting", ["defaults", "target_recall=0.95"])
def test_bank_ivf(benchmark, bank_data, reference, setting):
    """IVF-Flat with the Index defaults (nlist ≈ 4·√N, nprobe 16) and with nprobe calibrated for recall 0.95."""
    x, q, law = bank_data
    idx = Index(DIM, metric="cosine", kind="ivf_flat", target_recall=0.95 if setting != "defaults" else None)
    idx.add(x)
    idx.train()
    benchmark.group = f"bank-{law}-N{BANK_N}"
    _, ids = benchmark(idx.search, q, TOPK)
    benchmark.extra_info.update(recall10=recall_at(ids, reference), nprobe=idx.nprobe, nlist=idx.nlist)
    if idx.calibrated:
        benchmark.extra_info.update(calibrated_recall=idx.calibrated["recall"], reached=idx.calibrated["reached"])


@pytest.mark.skipif(faiss_or_none() is None, reason="faiss not installed")
def test_bank_ivf_refresh(benchmark, bank_data):
    x, _, law = bank_data
    idx = Index(DIM, metric="cosine", kind="ivf_flat")
    idx.add(x)
    idx.train()

    def refresh():
        idx.reset()
        idx.add(x)
    benchmark.group = f"refresh-{law}-N{BANK_N}"
    benchmark(refresh)


@pytest.fixture(scope="module")
def partner_data():
    g = torch.Generator().manual_seed(0)
    feats = clustered(PARTNER_N, 384, 0, clusters=50, noise=1.0)
    return feats, torch.round(torch.randn(PARTNER_N, generator=g).clamp(-3, 3) * 1.2)


@pytest.mark.parametrize("bug", [False, True])
def test_partners_vectorised(benchmark, partner_data, bug):
    feats, labels = partner_data
    windows = (0.5, 0.125) if FULL else (1.0, 1.0)
    benchmark.group = f"partners-N{PARTNER_N}"
    benchmark(label_aware_partners, feats, labels, 10, bug, *windows)


def test_partners_official_loop_64_rows(benchmark, partner_data):
    """The official loop on 64 anchors (× N/64 for the whole split)."""
    feats, labels = partner_data
    benchmark.group = f"partners-N{PARTNER_N}"
    benchmark(official_partner_loop, feats, labels, 10, rows=torch.arange(64))


@pytest.mark.parametrize("impl", ["official_loop", "op_torch"])
def test_hme_in_batch(benchmark, impl):
    h = clustered(256, DIM, 0, clusters=8, noise=0.8)
    benchmark.group = "hme-in-batch-B256"
    if impl == "official_loop":
        benchmark(official_loop_retrieve, h)
    else:
        benchmark(in_batch_retrieve, h, None, 0.6, "torch")
