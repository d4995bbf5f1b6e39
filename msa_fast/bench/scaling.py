"""Data-parallel scaling of a training epoch on this machine: 1 vs N processes (torchrun, gloo, one thread each).

``msa-fast bench scaling --models lnln hme --nproc 1 2`` times the second of two training epochs of each model
(``TINY_CONFIG`` by default, ``--full`` for the MOSI configuration without BERT) on synthetic MOSI, in fresh
torchrun jobs, and reports:
- **strong scaling**: the same data (``--n-train``) and global batch (``--batch-size``) on N processes;
  speed-up = t(1) / t(N), efficiency = speed-up / N;
- **weak scaling**: N× the data and N× the global batch on N processes (each rank does the 1-process work);
  efficiency = t(1) / t(N);
- **communication share**: seconds in collectives per epoch / epoch seconds, measured by a DDP comm hook that
  all-reduces each gradient bucket synchronously (so the time is the all-reduce's own, not hidden behind the
  backward: an upper bound of what overlap leaves) plus the gathers of cross-sample models
  (``msa_fast.distributed.comm_seconds``). The epoch time reported is the normal (overlapped) run's.
- **8-GPU model** (``--gpu-model``, no GPU needed): gradient bytes per step of each model and the NCCL ring
  all-reduce time 2·(N−1)/N · bytes / bus bandwidth at the stated bandwidths — a paper model, not a measurement.

Each configuration runs in its own torchrun job; a shared machine makes single epochs noisy (``--repeat``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

from . import format_table, write_outputs

SMOKE = {"models": ["lnln"], "nproc": [1, 2], "n_train": 32, "batch_size": 8, "repeat": 1, "full": False}
#: NCCL bus bandwidths (GB/s) of the 8-GPU paper model: NVLink 4 (H100/H200 SXM, ~ what nccl-tests reports as
#: busbw for large all-reduces) and PCIe 4.0 x16.
GPU_LINKS = {"NVLink4 (~360 GB/s busbw)": 360e9, "PCIe4 x16 (~22 GB/s busbw)": 22e9}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=["lnln", "hme"], help="registered models (default lnln hme)")
    p.add_argument("--nproc", nargs="+", type=int, default=[1, 2], help="process counts (default 1 2)")
    p.add_argument("--n-train", type=int, default=128, help="training samples of the 1-process run (default 128)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch of the 1-process run (default 16)")
    p.add_argument("--repeat", type=int, default=1, help="torchrun jobs per configuration; the median is kept")
    p.add_argument("--full", action="store_true", help="the MOSI configuration (no BERT) instead of TINY_CONFIG")
    p.add_argument("--gpu-model", action="store_true",
                   help="also print the 8-GPU all-reduce paper model (gradient bytes per step of each model)")


# --------------------------------------------------------------------------------------------------------------
# one rank of one configuration (run by torchrun)
# --------------------------------------------------------------------------------------------------------------
def _rank_main(spec: dict) -> None:
    import torch

    from .. import distributed
    from ..data.synthetic import synthetic
    from ..models.registry import build, get_config
    from ..train import Trainer, TrainConfig
    from ..train.data import _needs_aligned
    from ..train.dist import init_from_env, leave_process_group
    from ..train.run import smoke_model_overrides

    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    completed = False
    try:
        overrides = {"use_text_features": True} if spec["full"] else smoke_model_overrides(spec["model"])
        config = get_config(spec["model"], "mosi", **overrides)
        data = synthetic("mosi", spec["n_train"], 8, 8, seed=0, aligned=_needs_aligned(config),
                         text_features=True)
        torch.manual_seed(0)
        model = build(spec["model"], dataset="mosi", **overrides)
        cfg = TrainConfig(epochs=2, batch_size=spec["batch_size"], quiet=True, seed=1, warmup_epochs=0,
                          lr_schedule="constant", early_stop=2)
        trainer = Trainer(model, data["train"], data["valid"], data["test"], cfg)
        comm = [0.0]
        if spec["timed_comm"] and ctx.active:
            trainer.step_module.register_comm_hook(comm, _timed_allreduce_hook)
        trainer.train_epoch(1)  # warm-up: allocations, one-time dispatch
        ctx.barrier()
        comm[0], distributed.comm_seconds[0] = 0.0, 0.0
        start = time.perf_counter()
        trainer.train_epoch(2)
        ctx.barrier()
        seconds = time.perf_counter() - start
        if ctx.is_main:
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            with open(spec["out"], "w") as f:
                json.dump({"seconds": seconds, "comm": comm[0] + distributed.comm_seconds[0], "params": params}, f)
        completed = True
    finally:
        leave_process_group(completed)


def _timed_allreduce_hook(state, bucket):  # no annotations: DDP checks them against its own types
    """DDP comm hook: the default averaging all-reduce, waited for here so its duration is measured."""
    import torch

    start = time.perf_counter()
    buf = bucket.buffer()
    buf.div_(torch.distributed.get_world_size())
    torch.distributed.all_reduce(buf)
    state[0] += time.perf_counter() - start
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def _launch(spec: dict, nproc: int) -> dict:
    """One torchrun job of ``nproc`` ranks running ``_rank_main(spec)``; the main rank's measurements."""
    from torch.distributed.run import parse_args, run as torchrun

    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(spec, out=os.path.join(tmp, "result.json"))
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torchrun(parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "msa_fast.bench.scaling",
                             "--rank-spec", spec_path]))
        with open(spec["out"]) as f:
            return json.load(f)


def _measure(model: str, nproc: int, n_train: int, batch_size: int, full: bool, repeat: int) -> dict:
    spec = {"model": model, "n_train": n_train, "batch_size": batch_size, "full": full}
    runs = [_launch(dict(spec, timed_comm=False), nproc) for _ in range(repeat)]
    timed = [_launch(dict(spec, timed_comm=True), nproc) for _ in range(repeat)] if nproc > 1 else [{"comm": 0.0}]
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "comm": statistics.median(r["comm"] for r in timed), "params": runs[0]["params"]}


def main(args: argparse.Namespace) -> int:
    rows = []
    for model in args.models:
        base = _measure(model, 1, args.n_train, args.batch_size, args.full, args.repeat)
        for n in args.nproc:
            if n == 1:
                rows.append(_row(model, "-", 1, base, base))
                continue
            strong = _measure(model, n, args.n_train, args.batch_size, args.full, args.repeat)
            weak = _measure(model, n, args.n_train * n, args.batch_size * n, args.full, args.repeat)
            rows.append(_row(model, "strong", n, strong, base))
            rows.append(_row(model, "weak", n, weak, base))
    print(f"training epoch (2nd of 2), synthetic MOSI {args.n_train} samples, global batch {args.batch_size} "
          f"(weak: ×N both), {'MOSI config' if args.full else 'TINY_CONFIG'}, 1 thread per process, gloo")
    print(format_table(rows))
    if args.gpu_model:
        print()
        print("8-GPU data-parallel paper MODEL (not measured): fp32 gradient bytes per step, ring all-reduce "
              "2(N-1)/N·bytes/busbw; DDP overlaps it with the backward, so the exposed time is at most this")
        print(format_table(gpu_model_rows(full_model_params(args.models))))
    write_outputs(args, rows)  # --json / --csv / --plot (shared: msa_fast.bench.write_outputs)
    return 0


def _row(model: str, kind: str, n: int, run: dict, base: dict) -> dict:
    speed = base["seconds"] / run["seconds"]
    return {"model": model, "scaling": kind, "procs": n, "epoch_s": round(run["seconds"], 3),
            "speedup": round(speed, 2) if kind != "weak" else "-",
            "efficiency": round(speed / n if kind == "strong" else speed, 2) if n > 1 else "-",
            "comm_s": round(run["comm"], 3), "comm_share": f"{100 * run['comm'] / run['seconds']:.1f}%"}


def full_model_params(models: list[str]) -> dict[str, int]:
    """Trainable parameters of each model's MOSI configuration without a text encoder (precomputed text features)
    and with a BERT of bert-base's shape (``BERT_BASE_CONFIG``; built from a config, nothing is downloaded)."""
    from ..models.registry import build
    from ..nn.text_encoder import BERT_BASE_CONFIG

    out = {}
    for m in models:
        for label, over in (("", {"use_text_features": True}),
                            (" + BERT-base", {"use_text_features": False, "bert": dict(BERT_BASE_CONFIG)})):
            model = build(m, dataset="mosi", **over)
            out[m + label] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def gpu_model_rows(params: dict[str, int], gpus: int = 8) -> list[dict]:
    """Paper model: fp32 gradient bytes per step and ring all-reduce milliseconds on ``gpus`` GPUs per link."""
    rows = []
    for model, n in params.items():
        grad_bytes = 4 * n
        row: dict[str, Any] = {"model (8 GPUs, MODEL)": model, "params": n, "grad_MB": round(grad_bytes / 1e6, 1)}
        for link, bw in GPU_LINKS.items():
            row[link + " ms"] = round(1e3 * 2 * (gpus - 1) / gpus * grad_bytes / bw, 3)
        rows.append(row)
    return rows


if __name__ == "__main__":  # a rank of a torchrun job
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank-spec", required=True)
    with open(parser.parse_args().rank_spec) as f:
        _rank_main(json.load(f))
