"""Collectives the models and the retrieval layer use under ``torch.distributed`` (the trainer's process group).

Below the trainer on purpose: a model's cross-sample objective (HME's in-batch retrieval) and a model's per-epoch
work over the train split (DashFusion's partner pools, HME's memory bank) call these, and they are identities in a
single process, so a model has one code path.

- ``BatchScope``: how this rank's rows relate to the global batch of the step (set by the trainer on the model for
  each training step). ``gather(x)`` all-gathers the rows of every rank **with gradient** (its backward sends each
  rank the sum over ranks of the gradient of its own rows), so an
  objective over the global batch back-propagates into every rank's encoder exactly as in one process.
- ``encode_batches_sharded``: the batches of a pass over ``n`` rows are dealt to the ranks, the results all-gathered
  (no gradient) into the same ``(n, ...)`` tensors on every rank: the single-process pass, 1/world per rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import time

import torch
from torch import Tensor

#: Seconds this process spent in the collectives of this module (read by ``msa-fast bench scaling``).
comm_seconds = [0.0]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_bounds(n: int, world_size: int) -> list[int]:
    """Boundaries of ``world_size`` contiguous parts of ``range(n)`` whose sizes differ by at most one."""
    return [round(n * r / world_size) for r in range(world_size + 1)]


@dataclass(frozen=True)
class BatchScope:
    """This rank's place in the step's global batch: ``sizes[r]`` real rows on rank r (a rank whose shard is a
    zero-weight stand-in has 0), ``local=True`` when the objective should stay per rank (cheaper, not the
    single-process meaning; ``TrainConfig.cross_sample="local"``)."""

    rank: int = 0
    sizes: tuple[int, ...] = ()
    local: bool = False

    @property
    def active(self) -> bool:
        return len(self.sizes) > 1 and not self.local

    @property
    def offset(self) -> int:
        return sum(self.sizes[:self.rank])

    def gather(self, x: Tensor) -> tuple[Tensor, slice]:
        """x (B_local, ...) → (rows of the global batch (sum(sizes), ...), the slice of this rank's real rows).

        Differentiable: the gradient of every rank's objective w.r.t. rows of rank r reaches rank r (summed).
        Rows beyond ``sizes[rank]`` (a stand-in shard) are not gathered. Identity when not ``active``."""
        if not self.active:
            return x, slice(0, x.shape[0])
        n_real = self.sizes[self.rank]
        width = max(self.sizes)
        padded = x[:n_real]
        if n_real < width:  # all_gather needs one shape on every rank
            padded = torch.cat([padded, padded.new_zeros((width - n_real, *x.shape[1:]))])
        parts = _AllGatherRows.apply(padded.contiguous(), self.rank, len(self.sizes))  # (world, width, ...)
        rows = torch.cat([parts[r, :s] for r, s in enumerate(self.sizes)])
        return rows, slice(self.offset, self.offset + n_real)


class _AllGatherRows(torch.autograd.Function):
    """all_gather with a backward: rank r's gradient is the sum over ranks of the gradient w.r.t. its block
    (an all-reduce of the stacked gradient, then r's block: every backend has all-reduce)."""

    @staticmethod
    def forward(ctx, x: Tensor, rank: int, world_size: int) -> Tensor:  # type: ignore[override]
        ctx.rank = rank
        parts = [torch.empty_like(x) for _ in range(world_size)]
        start = time.perf_counter()
        torch.distributed.all_gather(parts, x)
        comm_seconds[0] += time.perf_counter() - start
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        start = time.perf_counter()
        torch.distributed.all_reduce(grad)
        comm_seconds[0] += time.perf_counter() - start
        return grad[ctx.rank], None, None


def gather_rows_no_grad(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Concatenation over ranks of x (sizes[rank], ...) where rank r holds ``sizes[r]`` rows (no gradient)."""
    rank, world_size = world()
    if world_size == 1:
        return x
    width = max(sizes)
    padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))]) if x.shape[0] < width else x
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    start = time.perf_counter()
    torch.distributed.all_gather(parts, padded.contiguous())
    comm_seconds[0] += time.perf_counter() - start
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


@torch.no_grad()
def encode_batches_sharded(n: int, batch_size: int, encode: Callable[[range], dict[str, Tensor]],
                           ) -> dict[str, Tensor]:
    """``encode(rows)`` over the batches ``range(0, n, batch_size)`` dealt round-robin to the ranks, results
    all-gathered in row order: every rank gets ``{name: (n, ...)}``.

    Each batch is the one a single process would encode (same rows, same padding), so the result is the
    single-process result bit for bit, computed 1/world per rank. ``encode(range) -> {name: (len(range), ...)}``.
    A collective: every rank must call it at the same point. One process: the batches in order, concatenated."""
    rank, world_size = world()
    starts = list(range(0, n, batch_size))
    mine = [encode(range(s, min(s + batch_size, n))) for i, s in enumerate(starts) if i % world_size == rank]
    if world_size == 1:
        return {k: torch.cat([m[k] for m in mine]) for k in mine[0]} if mine else {}
    # a rank without batches still needs the names, dtypes and trailing shapes
    meta: list = [None] * world_size
    torch.distributed.all_gather_object(
        meta, {k: (v.dtype, tuple(v.shape[1:]), str(v.device)) for k, v in mine[0].items()} if mine else None)
    ref = next(m for m in meta if m is not None)
    sizes = [sum(min(batch_size, n - s) for i, s in enumerate(starts) if i % world_size == r)
             for r in range(world_size)]
    # rank-major concatenation → row order: rank r's j-th batch is global batch r + j·world
    order = torch.cat([torch.arange(s, min(s + batch_size, n))
                       for r in range(world_size) for i, s in enumerate(starts) if i % world_size == r])
    out = {}
    for name, (dtype, tail, device) in ref.items():
        local = torch.cat([m[name] for m in mine]) if mine else torch.empty((0, *tail), dtype=dtype, device=device)
        rows = gather_rows_no_grad(local, sizes)
        placed = torch.empty_like(rows)
        placed[order.to(rows.device)] = rows
        out[name] = placed
    return out
