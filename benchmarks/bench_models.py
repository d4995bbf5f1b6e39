"""pytest-benchmark suite for whole models (forward and training step) on MOSI-shaped inputs.

Tiny by default so CI runs every case once (``--benchmark-disable``): batch 2, tiny random BERT, training steps only
for the ``features`` variant on the ``auto`` backend. ``MSA_FAST_BENCH_FULL=1`` = MOSI batch 16 and every variant ×
backend, e.g. ``MSA_FAST_BENCH_FULL=1 pytest benchmarks/bench_models.py --benchmark-only``;
``MSA_FAST_BENCH_BATCH=N`` sets the batch, ``MSA_FAST_BENCH_FULL_BERT=1`` a BERT-base-sized random BERT. For the table with ratios and
per-case peak memory use ``msa-fast bench models`` (msa_fast/bench/models.py), which shares these setup functions.
"""
from __future__ import annotations

import os

import pytest
import torch

from msa_fast.bench.models import MODELS, available_models, backend_context, build_case

FULL = os.environ.get("MSA_FAST_BENCH_FULL") == "1"
BATCH = int(os.environ.get("MSA_FAST_BENCH_BATCH", "16" if FULL else "2"))
FULL_BERT = os.environ.get("MSA_FAST_BENCH_FULL_BERT") == "1"
ALL = FULL
DATASET = os.environ.get("MSA_FAST_BENCH_DATASET", "mosi")
FOUND = sorted(available_models(MODELS))

TRAIN_CASES = [(v, b) for v in ("bert", "features") for b in ("auto", "torch") if ALL or (v, b) == ("features", "auto")]


def _case(model_name: str, variant: str):
    built = build_case(model_name, variant, BATCH, DATASET, FULL_BERT)
    if built is None:
        pytest.skip(f"{model_name} has no use_text_features option")
    return built


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("variant", ["bert", "features"])
@pytest.mark.parametrize("model_name", FOUND)
def test_model_forward(benchmark, model_name, variant, backend):
    model, batch = _case(model_name, variant)
    model.eval()
    benchmark.group = f"{model_name}-forward"
    with backend_context(backend), torch.no_grad():
        out = benchmark(model, batch)
    assert out["M"].shape == (batch.batch_size,)
    assert torch.isfinite(out["M"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("variant, backend", TRAIN_CASES)
@pytest.mark.parametrize("model_name", FOUND)
def test_model_training_step(benchmark, model_name, variant, backend):
    model, batch = _case(model_name, variant)
    model.train()
    model.prepare_epoch(1, batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model.training_step(batch)["loss"]
        loss.backward()
        opt.step()
        return loss.detach()

    benchmark.group = f"{model_name}-train"
    with backend_context(backend):
        loss = benchmark(step)
    assert torch.isfinite(loss)
