"""Feature harmonisation across MMSA datasets for the domain-generalisation protocol (``msa_fast.train.dg``).

The standard pickles disagree on everything but text: audio / vision dims (MOSI 5 / 20, MOSEI 74 / 35,
SIMS 33 / 709), sequence lengths and label ranges. ``harmonise_domain`` maps one domain's MMSA dict into a shared
layout that any model reads with one configuration:

- **feature dims** (``method``):
  ``"projection"`` (default, strict DG): x ↦ x · R_{domain, modality}, R a *fixed, data-independent* map
  D_domain → ``shared_dim`` (orthonormal rows when D ≤ shared_dim: an exact isometric embedding; orthonormal columns
  scaled by √(D / shared_dim) when D is larger, a norm-preserving random projection). R is drawn from a seed that is
  a function of (dataset name, modality, D) only, so an unseen target domain has its map without any of its data
  being looked at; everything learned sits after it and is shared.
  ``"standardise"``: each feature first z-scored with the mean / std of that domain's **train split** inputs (valid
  frames), then the same fixed map. This reads the target's unlabelled train inputs (no labels): not strict DG
  (closer to test-time normalisation) — an option, never the default.
- **lengths**: every sequence is right-padded with zeros to the common length (the longest padded length among the
  domains of the experiment: array shapes only, no values); ``*_lengths`` keep the real lengths, so models see the
  padding through their masks. Nothing is truncated.
- **labels**: ``regression_labels`` on the [-1, 1] scale (÷ 3 for MOSI / MOSEI, SIMS unchanged);
  ``regression_labels_native`` keeps the original values (the target is reported in its native scale).
- ``domain``: the domain id of every sample (int64); ``id`` prefixed with the dataset name. Unimodal labels (SIMS
  only) are dropped: they exist in one domain only.
"""
from __future__ import annotations

import zlib
from typing import Mapping, Optional, Sequence

import numpy as np

from .domains import label_unit

__all__ = ["HARMONISATIONS", "fixed_projection", "harmonise_domain", "common_lengths", "concat_splits"]

HARMONISATIONS = ("projection", "standardise")
_KEEP = ("text_bert", "text", "audio", "vision", "audio_lengths", "vision_lengths", "regression_labels", "id",
         "raw_text")


def fixed_projection(dataset: str, modality: str, in_dim: int, shared_dim: int) -> np.ndarray:
    """(in_dim, shared_dim) float32 map of (dataset, modality, in_dim): a function of those three only."""
    seed = zlib.crc32(f"msa_fast.harmonise/{dataset}/{modality}/{in_dim}".encode())
    g = np.random.default_rng(seed).standard_normal((max(in_dim, shared_dim), min(in_dim, shared_dim)))
    q, _ = np.linalg.qr(g)  # orthonormal columns
    if in_dim <= shared_dim:
        return np.ascontiguousarray(q.T, dtype=np.float32)  # (in, shared) with orthonormal rows: isometry
    return (q * np.sqrt(in_dim / shared_dim)).astype(np.float32)  # (in, shared): norm-preserving on average


def common_lengths(domains: Sequence[Mapping[str, Mapping]]) -> dict[str, int]:
    """{"text", "audio", "vision"}: the longest padded length over every split of every domain (shapes only)."""
    out = {"text": 0, "audio": 0, "vision": 0}
    for splits in domains:
        for s in splits.values():
            out["text"] = max(out["text"], np.shape(s["text_bert"])[2])
            out["audio"] = max(out["audio"], np.shape(s["audio"])[1])
            out["vision"] = max(out["vision"], np.shape(s["vision"])[1])
    return out


def _valid_frames(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    return x[np.arange(x.shape[1])[None, :] < lengths[:, None]]


def _pad_to(x: np.ndarray, length: int, axis: int) -> np.ndarray:
    if x.shape[axis] == length:
        return x
    width = [(0, 0)] * x.ndim
    width[axis] = (0, length - x.shape[axis])
    return np.pad(x, width)


def harmonise_domain(splits: Mapping[str, Mapping], dataset: str, domain_id: int, lengths: Mapping[str, int],
                     method: str = "projection", shared_dim: int = 64) -> dict[str, dict]:
    """One domain's ``{split: MMSA dict}`` (validated by ``load_mmsa``) in the shared layout (module docstring)."""
    if method not in HARMONISATIONS:
        raise ValueError(f"harmonisation must be one of {HARMONISATIONS}, got {method!r}")
    if not isinstance(shared_dim, int) or shared_dim < 1:
        raise ValueError(f"shared_dim must be a positive int, got {shared_dim!r}")
    stats: dict[str, Optional[tuple[np.ndarray, np.ndarray]]] = {"audio": None, "vision": None}
    if method == "standardise":
        train = splits["train"]
        for m in stats:
            frames = _valid_frames(np.asarray(train[m]), np.asarray(train[f"{m}_lengths"]))
            std = frames.std(0) if len(frames) else np.ones(np.shape(train[m])[2])
            stats[m] = (frames.mean(0) if len(frames) else 0.0, np.where(std > 1e-6, std, 1.0))
    unit = label_unit(dataset)
    out = {}
    for name, s in splits.items():
        h = {k: s[k] for k in _KEEP if k in s}
        n = len(h["regression_labels"])
        for m in ("audio", "vision"):
            x, lens = np.asarray(s[m], dtype=np.float32), np.asarray(s[f"{m}_lengths"])
            if stats[m] is not None:
                mean, std = stats[m]
                valid = (np.arange(x.shape[1])[None, :] < lens[:, None])[..., None]
                x = np.where(valid, (x - mean) / std, 0.0).astype(np.float32)  # padding stays exactly 0
            x = x @ fixed_projection(dataset, m, x.shape[2], shared_dim)  # linear, no bias: zeros stay zeros
            h[m] = _pad_to(x, lengths[m], 1)
        h["text_bert"] = _pad_to(np.asarray(s["text_bert"], dtype=np.float32), lengths["text"], 2)
        if "text" in s:
            h["text"] = _pad_to(np.asarray(s["text"], dtype=np.float32), lengths["text"], 1)
        native = np.asarray(s["regression_labels"], dtype=np.float32).reshape(-1)
        h["regression_labels_native"] = native
        h["regression_labels"] = (native / unit).astype(np.float32)
        h["domain"] = np.full(n, domain_id, dtype=np.int64)
        h["id"] = np.array([f"{dataset}/{i}" for i in s.get("id", range(n))], dtype=object)
        if "raw_text" not in h:
            h["raw_text"] = np.array([""] * n, dtype=object)
        out[name] = h
    return out


def concat_splits(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate harmonised split dicts (same layout) along the sample axis; ``text`` only if every part has it."""
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}
