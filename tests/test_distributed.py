"""Data-parallel training on torch.distributed: the same global batches as one process, through torchrun."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from msa_fast.data.dataset import make_loader
from msa_fast.data.synthetic import synthetic
from msa_fast.train.dist import GlobalBatchShards, loss_weight


def test_one_rank_walks_the_single_process_batches():
    data = synthetic("mosi", 37, 4, 4, seed=0)
    for seed in (0, 5):
        ref = [b.index.tolist() for b in make_loader(data["train"], batch_size=8, shuffle=True, seed=seed)]
        got = [rows for rows, _, _ in GlobalBatchShards(37, 8, 0, 1, shuffle=True, seed=seed)]
        assert [len(r) for r in got] == [8, 8, 8, 8, 5] and got == ref


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_split_every_global_batch_exactly_once(world):
    full = GlobalBatchShards(21, 8, 0, 1, seed=3).global_batches()
    per_rank = [list(GlobalBatchShards(21, 8, r, world, seed=3)) for r in range(world)]
    for step, batch in enumerate(full):
        parts = [per_rank[r][step] for r in range(world)]
        assert all(n_global == len(batch) for _, _, n_global in parts)
        assert [i for rows, n, _ in parts if n for i in rows] == batch  # contiguous shards, in order
        assert sum(loss_weight(n, len(batch), world) for _, n, _ in parts) == pytest.approx(world)


def _train(tmp, nproc: int, *extra):
    out = tmp / f"n{nproc}"
    argv = [sys.executable, "-m", "msa_fast", "train", "-m", "lnln", "--smoke", "--seeds", "1", "--epochs", "2",
            "--out", str(out), "--quiet", "--nproc", str(nproc), *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, out


@pytest.mark.slow
@pytest.mark.parametrize("missing", [[], ["--missing", "lnln:0.5"]])
def test_two_gloo_ranks_match_one_process(tmp_path, missing):
    one, out1 = _train(tmp_path, 1, *missing)
    two, out2 = _train(tmp_path, 2, *missing)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    tag = "normal" if not missing else "missing-lnln_0.5"
    name = "lnln-mosi" + ("" if not missing else "-lnln_0.5")
    a = torch.load(out1 / "checkpoints" / f"{name}-seed1" / "last.pt", weights_only=True)
    b = torch.load(out2 / "checkpoints" / f"{name}-seed1" / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: {m}")
    rows = list(csv.reader(open(out2 / "results" / tag / "mosi.csv")))
    assert len(rows) == 2  # one writer: rank 0
    assert a["history"][-1]["valid"]["MAE"] == pytest.approx(b["history"][-1]["valid"]["MAE"], abs=1e-4)


@pytest.mark.slow
def test_cross_sample_models_are_refused_on_every_rank(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "msa_fast", "train", "-m", "hme", "--smoke", "--seeds", "1",
                           "--out", str(tmp_path), "--quiet", "--nproc", "2"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "data-parallel training of it is not supported yet" in proc.stderr
    assert "2 of 2 ranks failed" in proc.stderr
