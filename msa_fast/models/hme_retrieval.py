"""HME's threshold retrieval from a train-set memory bank (msa_fast's default at evaluation).

The in-batch retrieval (official, used in training and with ``eval_retrieval="in_batch"``) is the retrieval helper's
sync-free op ``msa_fast.retrieval.in_batch.in_batch_retrieve``. The bank applies the same rule with the training set
as the indexed set: for a query h_i (D,), neighbours = {bank rows j : cos(h_i, b_j) ≥ α}; R_i = unweighted mean of
the neighbours; fallback when there is no neighbour **or** Σ_k h_ik == 0 (official entry-sum test): R_i = mean of the
bank rows whose entry sum ≠ 0. No self exclusion (evaluation samples are not in the bank). Exact (one (B, N) GEMM,
no top-k), so no neighbour above the threshold is ever cut off.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COS_EPS = 1e-8  # F.cosine_similarity's eps: zero rows get cosine 0 with everything


def bank_retrieve(queries: Tensor, keys: Tensor, key_ok: Tensor, threshold: float) -> tuple[Tensor, dict[str, Tensor]]:
    """queries (B, D), bank keys (N, D), key_ok (N,) bool (filled rows) → R (B, D) and
    ``{"cos": (B, N), "neighbours": (B, N) bool, "count": (B,), "fallback": (B,) bool}``. No host sync."""
    with torch.no_grad():  # the neighbour decision is piecewise constant: no gradient through the cosine
        cos = F.normalize(queries.detach(), dim=1, eps=COS_EPS) @ F.normalize(keys, dim=1, eps=COS_EPS).T
        neighbours = (cos >= threshold) & key_ok[None, :]
        count = neighbours.sum(dim=1)
        candidates = (keys.sum(dim=1) != 0) & key_ok
        fallback = (count == 0) | (queries.detach().sum(dim=1) == 0)
        dtype = keys.dtype
        r_neigh = (neighbours.to(dtype) @ keys) / count.clamp_min(1).to(dtype)[:, None]
        r_fallback = (candidates.to(dtype) @ keys) / candidates.sum().clamp_min(1).to(dtype)  # zeros if none
        r = torch.where(fallback[:, None], r_fallback[None, :], r_neigh)
    return r, {"cos": cos, "neighbours": neighbours, "count": count, "fallback": fallback}


class EmbeddingBank(nn.Module):
    """Train-set memory bank of the pooled embeddings H_m, one row per training sample (``Batch.index``).

    values (N, M, D) and filled (N,) bool are non-persistent buffers (never part of the official state_dict);
    ``retrieve`` applies the official threshold rule with the bank as the indexed set (no self exclusion: evaluation
    samples are not in the bank), so a prediction depends on the sample alone, not on its evaluation batch.
    """

    def __init__(self, num_modalities: int, dim: int):
        super().__init__()
        self.num_modalities, self.dim = num_modalities, dim
        self.register_buffer("values", torch.zeros(0, num_modalities, dim), persistent=False)
        self.register_buffer("filled", torch.zeros(0, dtype=torch.bool), persistent=False)

    def __len__(self) -> int:
        return int(self.filled.sum())

    def reset(self, size: int = 0) -> None:
        self.values = self.values.new_zeros(size, self.num_modalities, self.dim)
        self.filled = self.filled.new_zeros(size)

    @torch.no_grad()
    def update(self, index: Tensor, h: Tensor) -> None:
        """index (B,) int64 train rows, h (B, M, D) embeddings (stored detached)."""
        if h.shape[1:] != (self.num_modalities, self.dim) or index.shape != h.shape[:1]:
            raise ValueError(f"bank update expects index (B,) and h (B, {self.num_modalities}, {self.dim}), got "
                             f"{tuple(index.shape)} and {tuple(h.shape)}")
        need = int(index.max()) + 1 if index.numel() else 0
        if need > self.values.shape[0]:
            grown = self.values.new_zeros(need, self.num_modalities, self.dim)
            grown[: self.values.shape[0]] = self.values
            filled = self.filled.new_zeros(need)
            filled[: self.filled.shape[0]] = self.filled
            self.values, self.filled = grown, filled
        self.values[index] = h.detach().to(self.values.dtype)
        self.filled[index] = True

    def retrieve(self, modality: int, queries: Tensor, threshold: float) -> tuple[Tensor, dict[str, Tensor]]:
        """queries (B, D) → R (B, D) from this modality's bank rows, info as ``bank_retrieve``."""
        if len(self) == 0:
            raise RuntimeError("HME memory bank is empty: train the model (prepare_epoch records the train split), "
                               "call model.build_memory_bank(train_batches), or set eval_retrieval='in_batch'")
        return bank_retrieve(queries, self.values[:, modality].to(queries.dtype), self.filled, threshold)


def iterate_batches(train_data: Any, batch_size: int = 128) -> Iterable:
    """Batches covering a train split given as a ``Batch``, an ``MMSADataset`` / split dict, or an iterable of
    ``Batch`` (e.g. a DataLoader)."""
    from ..data.batch import Batch
    from ..data.dataset import MMSADataset, make_loader

    if isinstance(train_data, Batch):
        yield train_data
        return
    if isinstance(train_data, (MMSADataset, dict)):
        yield from make_loader(train_data, batch_size=batch_size, shuffle=False)
        return
    yield from train_data
