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
from msa_fast.train.dist import GlobalBatchShards, leave_process_group, loss_weight


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


def _train(tmp, nproc: int, *extra, model="lnln", epochs=2):
    out = tmp / f"{model}-n{nproc}"
    argv = [sys.executable, "-m", "msa_fast", "train", "-m", model, "--smoke", "--seeds", "1", "--epochs", str(epochs),
            "--out", str(out), "--quiet", "--nproc", str(nproc), *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, out


def _assert_same_parameters(a: dict, b: dict, tol: float = 1e-4) -> None:
    for k, v in a["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(b["model"][k], v, rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


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
    _assert_same_parameters(a, b)
    rows = list(csv.reader(open(out2 / "results" / tag / "mosi.csv")))
    assert len(rows) == 2  # one writer: rank 0
    assert a["history"][-1]["valid"]["MAE"] == pytest.approx(b["history"][-1]["valid"]["MAE"], abs=1e-4)


#: Randomness off (dropout, VIB noise): their draws depend on the shard shape, the objective does not.
DETERMINISTIC = {
    "hme": ["attn_dropout=0", "relu_dropout=0", "res_dropout=0", "embed_dropout=0", "gate_dropout=0", "dropout=0",
            "final_dropout=0", "vib_sample_in_training=false"],
    "dashfusion": ["encoder_dropout=0", "input_dropout=0", "fusion_dropout=0", "contrastive_weight=0.2"],
    "midg": ["adapter_dropout=0", "dropout=0"],
}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hme", "dashfusion", "midg"])
def test_cross_sample_models_match_one_process_on_two_ranks(tmp_path, model):
    """HME's in-batch retrieval gathers the global batch with gradient, DashFusion's partners are drawn per anchor
    and its pools come from the sharded-and-gathered train pass: 2 ranks train the 1-process parameters. The batch
    size 7 leaves the last global batch uneven, and the batch of 1 (37 = 5·7 + 2 → shards 1/1) ... exercised by the
    sampler test; here 2 epochs cover DashFusion's pool rebuild (epoch 1) and reuse (epoch 2). MIDG (no cross-sample
    term) checks the expert-mixture model trains the same way too."""
    extra = ["--batch-size", "7"] + [x for kv in DETERMINISTIC[model] for x in ("--set", kv)]
    one, out1 = _train(tmp_path, 1, *extra, model=model)
    two, out2 = _train(tmp_path, 2, *extra, model=model)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    (ckpt1,) = (out1 / "checkpoints").iterdir()
    a = torch.load(ckpt1 / "last.pt", weights_only=True)
    b = torch.load(out2 / "checkpoints" / ckpt1.name / "last.pt", weights_only=True)
    _assert_same_parameters(a, b)
    assert a["history"][-1]["valid"]["MAE"] == pytest.approx(b["history"][-1]["valid"]["MAE"], abs=1e-4)


@pytest.mark.slow
def test_local_cross_sample_scope_is_a_different_objective(tmp_path):
    """``--cross-sample local`` (each rank retrieves over its shard only) runs and trains other parameters."""
    extra = ["--batch-size", "8"] + [x for kv in DETERMINISTIC["hme"] for x in ("--set", kv)]
    glob, out_g = _train(tmp_path / "g", 2, *extra, model="hme", epochs=1)
    loc, out_l = _train(tmp_path / "l", 2, *extra, "--cross-sample", "local", model="hme", epochs=1)
    assert glob.returncode == 0 and loc.returncode == 0, (glob.stderr + loc.stderr)[-3000:]
    (ckpt,) = (out_g / "checkpoints").iterdir()
    a = torch.load(ckpt / "last.pt", weights_only=True)["model"]
    b = torch.load(out_l / "checkpoints" / ckpt.name / "last.pt", weights_only=True)["model"]
    assert any(not torch.allclose(a[k], b[k], atol=1e-6) for k in a if a[k].is_floating_point())


def test_models_that_mix_samples_without_gathering_are_refused_under_several_ranks():
    from msa_fast.train.dist import DistContext, wrap_for_training

    class Mixer(torch.nn.Module):
        cross_sample_training = True

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match="does not gather them across ranks"):
        wrap_for_training(Mixer(), DistContext(0, 2))
    assert wrap_for_training(Mixer(), DistContext()).model.w is not None  # one process: fine


@pytest.mark.slow
def test_resume_under_a_different_world_size(tmp_path):
    """A run checkpointed by 2 ranks resumes on 1 process (and the other way round) into the parameters of an
    uninterrupted 1-process run: the checkpoint holds no per-rank state and epoch e's batches are f(seed, e).
    (A constant learning rate lets a finished 1-epoch run be extended to 2: the stand-in for an interruption.)"""
    constant = ["--set", "lr_schedule=constant", "--set", "warmup_epochs=0"]
    ref, out_ref = _train(tmp_path / "ref", 1, *constant, epochs=2)
    assert ref.returncode == 0, ref.stderr[-2000:]
    final = torch.load(out_ref / "checkpoints" / "lnln-mosi-seed1" / "last.pt", weights_only=True)
    for first, then in ((2, 1), (1, 2)):
        a, out = _train(tmp_path / f"{first}to{then}", first, *constant, epochs=1)
        assert a.returncode == 0, a.stderr[-2000:]
        b = subprocess.run([sys.executable, "-m", "msa_fast", "train", "-m", "lnln", "--smoke", "--seeds", "1",
                            "--epochs", "2", "--out", str(out), "--quiet", "--nproc", str(then), "--resume",
                            *constant], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert b.returncode == 0, b.stderr[-2000:]
        got = torch.load(out / "checkpoints" / "lnln-mosi-seed1" / "last.pt", weights_only=True)
        assert [h["epoch"] for h in got["history"]] == [1, 2]
        _assert_same_parameters(final, got)


@pytest.mark.slow
def test_mmcl_is_refused_under_several_ranks(tmp_path):
    """MMCL's replay buffer and carried state are per process: several ranks would be another algorithm."""
    proc, _ = _train(tmp_path, 2, model="mmcl", epochs=1)
    assert proc.returncode == 2
    assert "does not gather them across ranks" in proc.stderr and "2 of 2 ranks failed" in proc.stderr


@pytest.mark.parametrize("completed", [True, False])
def test_leaving_the_group_meets_the_other_ranks_only_after_normal_completion(monkeypatch, completed):
    """A rank that finished normally waits in a barrier before destroying the group (gloo's worker threads release
    the last collective's tensors after it returned; finalising the interpreter then aborted 1 run in ~15); a rank
    that failed must not wait for peers that may never come."""
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: calls.append("barrier"))
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda *a, **k: calls.append("destroy"))
    leave_process_group(completed)
    assert calls == (["barrier", "destroy"] if completed else ["destroy"])


def test_leaving_without_a_group_does_nothing(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "barrier", lambda *a, **k: pytest.fail("barrier without a group"))
    leave_process_group(True)
