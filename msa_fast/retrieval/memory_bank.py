"""``MemoryBank``: HME's cross-sample retrieval at scale, over the training set instead of the mini-batch.

Per modality the bank holds one pooled embedding per training sample (row = sample id), with an availability flag
(a missing modality is never retrieved), written from training batches (overwrite, or EMA with ``momentum``) and
indexed by an ``Index`` (exact flat or IVF). ``refresh()`` (once per epoch) re-indexes the stored vectors; a trained
IVF keeps its coarse quantizer and only re-adds vectors. ``retrieve()`` returns the HME enhancement vector: the
aggregate of the k nearest (``k=None``: all) available training embeddings that pass the threshold (unweighted mean =
HME; similarity- or softmax-weighted optional), with HME's fallback (mean of all available stored rows with non-zero
entry sum) for queries without a qualifying neighbour. HME's evaluation-time bank (``eval_retrieval="bank"``) is a
``MemoryBank`` with ``k=None``.

Evaluation queries the training bank only (no ``exclude_ids``), so a test prediction never depends on other test
samples (the official in-batch retrieval is transductive at test time, method_hme.md §9b). During training pass the
batch's own ids as ``exclude_ids`` (self-exclusion by id). Retrieved vectors are stored, detached embeddings: unlike
the in-batch op, no gradient flows into the neighbours.

Neighbour *selection* uses the index as of the last refresh (flat banks refresh automatically when written to);
the aggregated vectors are read from the live storage and neighbours that became unavailable since are dropped.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .index import Index, check_vectors

WEIGHTINGS = ("mean", "similarity", "softmax")


def _check_temperature(temperature) -> float:
    """The softmax temperature τ must be a finite real number > 0 (τ = 0 divided the scores by zero: NaN weights,
    silently zeroed into all-zero vectors; τ < 0 inverts the ranking)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a finite number > 0 (softmax(score / temperature)), got "
                         f"{type(temperature).__name__} {temperature!r}")
    t = float(temperature)
    if not (math.isfinite(t) and t > 0.0):
        raise ValueError(f"temperature must be a finite number > 0 (softmax(score / temperature)), got {t}")
    return t


class MemoryBank:
    """Args: num_samples (training-set size N); dims (one int for all modalities, or {modality: dim});
    modalities; momentum (None = overwrite, else EMA new = m·old + (1 − m)·x for rows written before); metric /
    kind / device and ``index_kwargs`` for the per-modality ``Index``; auto_refresh (default: True for flat)."""

    def __init__(self, num_samples: int, dims: Union[int, Mapping[str, int]],
                 modalities: Sequence[str] = ("l", "a", "v"), *, momentum: Optional[float] = None,
                 metric: str = "cosine", kind: str = "flat", device: Union[str, torch.device] = "cpu",
                 index_kwargs: Optional[dict] = None, auto_refresh: Optional[bool] = None):
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1) or None (overwrite), got {momentum}")
        self.modalities = tuple(modalities)
        self.dims = {m: (dims if isinstance(dims, int) else int(dims[m])) for m in self.modalities}
        self.num_samples, self.momentum, self.metric, self.kind = num_samples, momentum, metric, kind
        self.device = torch.device(device)
        self.index_kwargs = dict(index_kwargs or {})
        self.auto_refresh = (kind == "flat") if auto_refresh is None else auto_refresh
        self.storage = {m: torch.zeros(num_samples, d, device=self.device) for m, d in self.dims.items()}
        self.written = {m: torch.zeros(num_samples, dtype=torch.bool, device=self.device) for m in self.modalities}
        self.available = {m: torch.zeros(num_samples, dtype=torch.bool, device=self.device) for m in self.modalities}
        self.indexes: dict[str, Index] = {}
        self._fallback_mean: dict[str, Tensor] = {}
        self._dirty = {m: True for m in self.modalities}

    # -- writing ---------------------------------------------------------------------------------------------
    def update(self, modality: str, ids: Tensor, embeddings: Tensor, available: Optional[Tensor] = None) -> None:
        """Write a training batch: ids (n,) sample ids in [0, N), embeddings (n, d) (detached), available (n,) bool
        (False = the modality is missing for that sample: stored as unavailable, never retrieved)."""
        self._check_modality(modality)
        check_vectors(embeddings, self.dims[modality], "embeddings")
        ids = self._check_ids(ids, embeddings.shape[0])
        if available is None:
            available = torch.ones(len(ids), dtype=torch.bool)
        if tuple(available.shape) != (len(ids),) or available.dtype != torch.bool:
            raise ValueError(f"available must be a bool tensor of shape ({len(ids)},), got "
                             f"{available.dtype} {tuple(available.shape)}")
        ids = ids.to(self.device)
        avail = available.to(self.device)
        x = embeddings.detach().to(self.device, torch.float32)
        store = self.storage[modality]
        if self.momentum is not None:
            old = store[ids]
            seen = (self.written[modality][ids] & avail)[:, None]
            x = torch.where(seen, self.momentum * old + (1.0 - self.momentum) * x, x)
        x = torch.where(avail[:, None], x, store[ids])  # a missing modality keeps whatever was stored (unused)
        store[ids] = x
        self.written[modality][ids] |= avail
        self.available[modality][ids] = avail
        self._dirty[modality] = True

    def refresh(self, modality: Optional[str] = None) -> None:
        """Re-index the stored available vectors (per epoch). IVF: trained on the first refresh, then re-add only."""
        for m in ([modality] if modality is not None else self.modalities):
            self._check_modality(m)
            rows = self.available[m].nonzero().flatten()
            if len(rows) == 0:
                raise ValueError(f"memory bank for modality {m!r} is empty: update() it before refresh/retrieve")
            x = self.storage[m][rows]
            idx = self.indexes.get(m)
            if idx is None:
                idx = Index(self.dims[m], metric=self.metric, kind=self.kind, device=self.device,
                            **self.index_kwargs)
                self.indexes[m] = idx
            idx.reset()
            idx.add(x, rows.cpu())
            if not idx.is_trained:
                idx.train()
            nonzero = x.sum(dim=1) != 0
            self._fallback_mean[m] = x[nonzero].mean(dim=0) if bool(nonzero.any()) else torch.zeros_like(x[0])
            self._dirty[m] = False

    # -- reading ---------------------------------------------------------------------------------------------
    def retrieve(self, modality: str, queries: Tensor, k: Optional[int], threshold: Optional[float] = None,
                 weighting: str = "mean", exclude_ids: Optional[Tensor] = None, temperature: float = 0.1,
                 fallback_mask: Optional[Tensor] = None) -> tuple[Tensor, dict[str, Any]]:
        """queries (nq, d) → (R (nq, d) enhancement vectors, info).

        The k nearest available bank rows (minus ``exclude_ids``, one id per query, −1 = none) that pass
        ``threshold`` (similarity ≥ t for ip/cosine, squared distance ≤ t for l2; None = all k) are aggregated:
        "mean" (HME), "similarity" (weights ∝ max(score, 0); ip/cosine only) or "softmax" (softmax(score / τ) with
        τ = ``temperature``, a finite number > 0 — 0, negative, NaN or inf raise ValueError whatever the weighting;
        for l2 the score is −distance). ``k=None``: every available row is a candidate (HME's exact "all neighbours
        above the threshold"; aggregated with one (nq, N) @ (N, d) GEMM). Queries without a qualifying neighbour, and
        those flagged in ``fallback_mask`` (nq,) bool (e.g. HME's entry-sum == 0 test), get the fallback mean.
        info: ``ids``, ``scores`` (nq, k), ``valid`` (nq, k) bool, ``fallback`` (nq,) bool (k = #available rows
        when ``k=None``).
        """
        self._check_modality(modality)
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if weighting == "similarity" and self.metric == "l2":
            raise ValueError("weighting='similarity' needs metric 'ip' or 'cosine'")
        _check_temperature(temperature)
        check_vectors(queries, self.dims[modality], "queries")
        if exclude_ids is not None:
            exclude_ids = torch.as_tensor(exclude_ids).to(torch.long)
            if tuple(exclude_ids.shape) != (queries.shape[0],) or bool((exclude_ids >= self.num_samples).any()):
                raise ValueError(f"exclude_ids must be ({queries.shape[0]},) ids < {self.num_samples} (−1 = none)")
        if fallback_mask is not None and (tuple(fallback_mask.shape) != (queries.shape[0],)
                                          or fallback_mask.dtype != torch.bool):
            raise ValueError(f"fallback_mask must be a bool tensor of shape ({queries.shape[0]},), got "
                             f"{fallback_mask.dtype} {tuple(fallback_mask.shape)}")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be a positive int or None (all available rows), got {k!r}")
        if modality not in self.indexes or (self._dirty[modality] and self.auto_refresh):
            self.refresh(modality)
        index = self.indexes[modality]
        scores, ids = index.search(queries, len(index) if k is None else k, exclude_ids=exclude_ids)
        ids = ids.to(self.device)
        scores = scores.to(self.device)
        valid = (ids >= 0) & self.available[modality][ids.clamp_min(0)]
        if threshold is not None:
            valid &= (scores <= threshold) if self.metric == "l2" else (scores >= threshold)
        w = self._weights(scores, valid, weighting, temperature)
        total = w.sum(dim=1, keepdim=True)
        if k is None:  # k ~ N: a dense (nq, N) weight matrix and one GEMM instead of gathering (nq, N, d) vectors
            dense = w.new_zeros(w.shape[0], self.num_samples).scatter_add_(1, ids.clamp_min(0), w)
            r = (dense @ self.storage[modality]) / total.clamp_min(1e-12)
        else:
            vecs = self.storage[modality][ids.clamp_min(0)]  # (nq, k, d)
            r = (w[..., None] * vecs).sum(dim=1) / total.clamp_min(1e-12)
        fallback = ~valid.any(dim=1)
        if fallback_mask is not None:
            fallback |= fallback_mask.to(self.device)
        r = torch.where(fallback[:, None], self._fallback_mean[modality][None, :], r)
        r = r.to(device=queries.device, dtype=queries.dtype)
        return r, {"ids": ids, "scores": scores, "valid": valid, "fallback": fallback}

    # -- helpers ---------------------------------------------------------------------------------------------
    def _weights(self, scores: Tensor, valid: Tensor, weighting: str, temperature: float) -> Tensor:
        if weighting == "mean":
            return valid.float()
        if weighting == "similarity":
            return scores.clamp_min(0) * valid
        logits = (-scores if self.metric == "l2" else scores) / temperature
        logits = logits.masked_fill(~valid, float("-inf"))
        w = torch.softmax(logits, dim=1)
        return torch.nan_to_num(w, nan=0.0)  # all-invalid rows: softmax of −inf row → NaN → 0 (fallback later)

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; bank has {self.modalities}")

    def _check_ids(self, ids: Tensor, n: int) -> Tensor:
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.dtype == torch.bool or tuple(ids.shape) != (n,):
            raise ValueError(f"ids must be an integer tensor of shape ({n},), got {ids.dtype} {tuple(ids.shape)}")
        ids = ids.to(torch.long)
        if n and (int(ids.min()) < 0 or int(ids.max()) >= self.num_samples):
            raise ValueError(f"ids must lie in [0, {self.num_samples}), got range [{int(ids.min())}, "
                             f"{int(ids.max())}]")
        if len(torch.unique(ids)) != n:
            raise ValueError("ids contains duplicates")
        return ids
