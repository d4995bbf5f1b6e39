"""Data-parallel training on ``torch.distributed`` (launched by ``torchrun``; gloo on CPU, NCCL on GPU).

One small object, ``DistContext``, owns what differs between ranks: rank / world size, the training batches of this
rank, gathers, and which process logs and writes files. Single-process runs get ``DistContext()`` (rank 0 of 1), so
the trainer has one code path.

Equivalence with one process: every rank walks the **same global batch sequence** a single process with the same
batch size walks (``GlobalBatchShards``: the single-process order of epoch e, each global batch cut into
``world_size`` contiguous shards), and each rank's loss is weighted by ``world · n_local / n_global`` so that DDP's
gradient average equals the gradient of the single-process batch mean, uneven last batches included. Masks of the
missing-data protocols are drawn from sample index and epoch, not from the rank, so they agree too.

Cross-sample terms keep their single-process meaning: each step the trainer hands the model a
``msa_fast.distributed.BatchScope`` (this rank's rows within the global batch) through ``TrainingStep``, and HME's
in-batch retrieval all-gathers the global batch's H with gradient through it; DashFusion's partner draw is a
function of (seed, epoch, anchor) and its NT-Xent is per anchor group, so its shards need no gather, and its
per-epoch partner pools are computed from the train split encoded 1/world per rank and gathered
(``encode_batches_sharded``). ``TrainConfig.cross_sample = "local"`` keeps each rank's objective on its shard
(cheaper, a different objective). A model that mixes samples (``cross_sample_training``) without gathering
(``gathers_global_batch``) is refused under several ranks.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import RandomSampler, Sampler

from ..distributed import BatchScope, shard_bounds

#: How long a collective may wait for the other ranks: a failed rank makes the others exit instead of hanging.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "DistContext":
        """The process group this process belongs to (rank 0 of 1 when not distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of ``value`` over ranks (a CPU float64 copy; exact for the counts and loss sums it is used for)."""
        value = value.detach().to("cpu", torch.float64).clone()
        if self.active:
            torch.distributed.all_reduce(value)
        return value

    def gather_in_order(self, items: Any) -> list[Any]:
        """``[items of rank 0, items of rank 1, ...]`` on every rank (any picklable objects, CPU tensors)."""
        if not self.active:
            return [items]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, items)
        return out

    def shard_range(self, n: int) -> range:
        """This rank's contiguous part of ``range(n)`` (sizes differ by at most one; evaluation shards)."""
        bounds = shard_bounds(n, self.world_size)
        return range(bounds[self.rank], bounds[self.rank + 1])


def init_from_env(device: str = "cpu", timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> DistContext:
    """Join the process group ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1): gloo for CPU runs,
    NCCL for CUDA (each rank on ``cuda:LOCAL_RANK``). Without those variables: single process, nothing to do."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return DistContext.current()
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend, timeout=timeout)
    return DistContext.current()


def leave_process_group(completed: bool = True) -> None:
    """Leave the process group this process joined (``init_from_env``) before the interpreter exits.

    ``completed`` (this rank's work ended normally, so every rank reaches this point): all ranks first meet in a
    barrier. Why: gloo's worker thread releases the tensors of a finished collective *after* the caller has returned,
    and releasing a tensor that Python no longer references needs the GIL; a rank that finalises the interpreter in
    that window aborts ("terminate called without an active exception", measured on 1 in ~15 two-rank DashFusion
    runs). Waiting in the barrier hands the GIL to that thread. ``destroy_process_group`` alone does not stop the
    threads: in torch 2.13 a group that once had a ``DistributedDataParallel`` on it keeps its worker threads past
    the destroy. A rank that failed skips the barrier (its peers may never arrive; torchrun stops them)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if completed:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def rank_device(device: str, ctx: DistContext) -> str:
    """``cuda`` under several ranks means this rank's GPU (``cuda:LOCAL_RANK``)."""
    if ctx.active and device in ("cuda", "auto") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class GlobalBatchShards(Sampler[list[int]]):
    """Batches of indices: the single-process sequence of ``batch_size`` batches (``RandomSampler`` seeded with
    ``seed``, or in order), each cut into ``world_size`` contiguous shards; yields ``(shard, n_global)`` pairs of
    rank ``rank``. A shard that would be empty (a last batch smaller than the world) repeats the batch's first
    sample with ``n_local = 0``, so every rank takes part in every gradient all-reduce with a zero weight."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, shuffle: bool = True, seed: int = 0):
        self.n, self.batch_size, self.rank, self.world = n, batch_size, rank, world_size
        self.shuffle, self.seed = shuffle, seed

    def global_batches(self) -> list[list[int]]:
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(int(self.seed))
            order = list(RandomSampler(range(self.n), generator=gen))
        else:
            order = list(range(self.n))
        return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]

    def __iter__(self) -> Iterator[tuple[list[int], int, int]]:
        for batch in self.global_batches():
            m = len(batch)
            bounds = shard_bounds(m, self.world)
            shard = batch[bounds[self.rank]:bounds[self.rank + 1]]
            yield (shard, len(shard), m) if shard else ([batch[0]], 0, m)

    def scope(self, n_global: int, local: bool = False) -> BatchScope:
        """The ``BatchScope`` of a global batch of ``n_global`` rows: each rank's number of real rows."""
        bounds = shard_bounds(n_global, self.world)
        return BatchScope(self.rank, tuple(b - a for a, b in zip(bounds, bounds[1:])), local)

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size


def loss_weight(n_local: int, n_global: int, world_size: int) -> float:
    """Factor on a rank's mean loss so that DDP's average of the ranks' gradients is the gradient of the mean over
    the global batch: ``world · n_local / n_global``."""
    return world_size * n_local / n_global


class TrainingStep(torch.nn.Module):
    """The one module DDP wraps: ``forward(batch, scope)`` is ``model.training_step(batch)`` with
    ``model.batch_scope = scope`` for the step, so the gradient hooks DDP installs see every parameter the
    objective touches, including through the gathers of a cross-sample objective."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, scope: Optional[BatchScope] = None) -> dict[str, torch.Tensor]:
        if scope is None:
            return self.model.training_step(batch)
        self.model.batch_scope = scope
        try:
            return self.model.training_step(batch)
        finally:
            self.model.batch_scope = BatchScope()


def wrap_for_training(model: torch.nn.Module, ctx: DistContext,
                      device_ids: Optional[Sequence[int]] = None) -> torch.nn.Module:
    """``TrainingStep(model)``, inside ``DistributedDataParallel`` when several ranks train."""
    step = TrainingStep(model)
    if not ctx.active:
        return step
    if getattr(model, "cross_sample_training", False) and not getattr(model, "gathers_global_batch", False):
        raise ValueError(f"{type(model).__name__}'s training objective mixes samples across the batch and the model "
                         f"does not gather them across ranks (gathers_global_batch); data-parallel training of it "
                         f"is not supported yet: run one process")
    # a model whose objective leaves some parameters without gradient in some steps sets
    # ``ddp_find_unused_parameters = True`` (an extra graph traversal per step otherwise wasted)
    return torch.nn.parallel.DistributedDataParallel(
        step, device_ids=device_ids, find_unused_parameters=bool(getattr(model, "ddp_find_unused_parameters", False)))
