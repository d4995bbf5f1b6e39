"""Synthetic *domains* for the domain-generalisation protocol: MOSI / MOSEI / SIMS-shaped MMSA dicts that share a
planted signal and differ in what a domain shift is made of.

``synthetic_domains(("mosi", "mosei", "sims"), ...) -> {name: MMSA dict}``; each dict is ``synthetic(name, ...)``
(its own feature dims, lengths, label range and scale, so the harmonisation has real work to do) plus:

- **a shared planted signal**: the label formula of ``msa_fast.data.synthetic`` in every domain; its text part lives
  in the domain-independent channel (the same sentiment words, the same direction u_t of the 768-d text features),
  so it transfers to any domain. The audio / vision parts live in each domain's own feature space (different dims,
  directions and offsets), as features from different extractors do: they help in-domain only.
- **a spurious shortcut with a shifted nuisance factor**: a scalar z per sample, written into the shared text
  channel (``z · u_sc`` on every valid text-feature token, u_sc a fixed unit direction, and the frequency of
  "artefact" words ids 203..212 rising with z — a transcription convention, say):

      z = ρ_d · y / σ_y + √(1 − ρ_d²) · ε + μ_d,     y the label on the [-1, 1] scale, σ_y = 0.5, ε ~ N(0, 1)

  ``DOMAIN_SHIFTS`` (ρ_d, μ_d): MOSI (0.95, +1.0), MOSEI (0.85, −1.0), SIMS (0, 0). In MOSI and MOSEI z predicts
  the label better than the true text signal does (R² ≈ 0.8 against ≈ 0.45), so plain risk minimisation on those
  sources leans on it; in SIMS it has the same spread but no label information, so that reliance turns into noise
  on an unseen SIMS target. Because its offset μ_d differs between the sources, using z also reveals the source domain — which is
  exactly what the gradient-reversal domain classifier (MIDG's default invariance) penalises, and because its label
  correlation ρ_d differs, what V-REx / IRM penalise. That is the *reason* MIDG beats its ``invariance="none"``
  ablation on the unseen synthetic SIMS (tests/test_protocol_dg.py), not a tuned accident.

``length_scale`` shrinks every sequence length (tests: a few seconds per run); the relative lengths of the
domains are kept, so they still differ.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from .specs import get_dataset_spec
from .synthetic import CLS_ID, PAD_ID, SEP_ID, synthetic

__all__ = ["synthetic_domains", "DOMAIN_SHIFTS", "ARTEFACT_IDS", "label_unit"]

#: (ρ_d shortcut-label correlation, μ_d nuisance offset) per domain.
DOMAIN_SHIFTS: dict[str, tuple[float, float]] = {"mosi": (0.95, 1.0), "mosei": (0.85, -1.0), "sims": (0.0, 0.0)}
ARTEFACT_IDS = (203, 213)  # [start, stop): a slice of the neutral-word range turned into artefact words
SHORTCUT_TEXT_SIGNAL = 1.0  # as synthetic's TEXT_FEATURE_SIGNAL: the shortcut is as visible as the true signal
LABEL_STD = 0.5  # ≈ std of the [-1, 1]-scale label of the synthetic formula
ARTEFACT_RATE = 0.3


def label_unit(dataset: str) -> float:
    """The factor native label / unit label of a dataset (3 for MOSI / MOSEI, 1 for SIMS)."""
    lo, hi = get_dataset_spec(dataset).label_range
    return float(max(abs(lo), abs(hi)))


def synthetic_domains(domains: Sequence[str] = ("mosi", "mosei", "sims"), n_train: int = 128, n_valid: int = 64,
                      n_test: int = 64, seed: int = 0, length_scale: float = 1.0,
                      shifts: Optional[Mapping[str, tuple[float, float]]] = None,
                      text_features: bool = True) -> dict[str, dict]:
    """``{name: MMSA dict}`` for each domain (see the module docstring).

    Args:
        domains: dataset names (each at most once).
        n_train, n_valid, n_test: split sizes per domain.
        seed: everything is a function of (seed, domain, split).
        length_scale: in (0, 1]; every audio / vision / text length L becomes max(1, ceil(L · scale)) (text ≥ 8).
        shifts: (ρ, μ) per domain overriding ``DOMAIN_SHIFTS`` (a domain missing from both gets (0, 0)).
        text_features: include the ``text`` key (precomputed BERT-like features).
    """
    if len(set(domains)) != len(domains):
        raise ValueError(f"domains must be distinct, got {list(domains)}")
    if not 0.0 < length_scale <= 1.0:
        raise ValueError(f"length_scale must lie in (0, 1], got {length_scale}")
    table = {**DOMAIN_SHIFTS, **dict(shifts or {})}
    const = np.random.default_rng(7919)  # the shared shortcut direction: one for every domain and seed
    u_sc = const.standard_normal(get_dataset_spec("mosi").text_dim).astype(np.float32)
    u_sc /= np.linalg.norm(u_sc)
    out = {}
    for k, name in enumerate(domains):
        data = synthetic(name, n_train, n_valid, n_test, seed=seed, text_features=text_features,
                         shared_text_space=True)
        rho, mu = table.get(name, (0.0, 0.0))
        rng = np.random.default_rng([int(seed), 104729, sum(map(ord, name))])
        out[name] = {split: _shift_split(_shorten(s, length_scale), rho, mu, u_sc, label_unit(name), rng)
                     for split, s in data.items()}
    return out


def _shorten(s: dict, scale: float) -> dict:
    """The split with every sequence ceil(L · scale) long (generator-side: lengths are clipped with the arrays, and
    text keeps its [SEP] as the last real token)."""
    if scale == 1.0:
        return s
    s = dict(s)
    for m in ("audio", "vision"):
        length = max(1, math.ceil(s[m].shape[1] * scale))
        s[m] = np.ascontiguousarray(s[m][:, :length])
        s[f"{m}_lengths"] = np.minimum(s[f"{m}_lengths"], length)
    lt = max(8, math.ceil(s["text_bert"].shape[2] * scale))
    tb = np.ascontiguousarray(s["text_bert"][:, :, :lt])
    n_tok = np.minimum(tb[:, 1].sum(1).astype(np.int64), lt)
    tb[np.arange(len(tb)), 0, n_tok - 1] = SEP_ID
    s["text_bert"] = tb
    if "text" in s:
        s["text"] = np.ascontiguousarray(s["text"][:, :lt])
    return s


def _shift_split(s: dict, rho: float, mu: float, u_sc: np.ndarray, unit: float, rng: np.random.Generator) -> dict:
    s = dict(s)
    n = len(s["regression_labels"])
    y = np.asarray(s["regression_labels"], dtype=np.float64) / unit
    # unit variance in every domain: only its label correlation ρ and its offset μ change across domains
    z = rho * y / LABEL_STD + np.sqrt(max(0.0, 1.0 - rho ** 2)) * rng.standard_normal(n) + mu
    tb = s["text_bert"].copy()
    ids, mask = tb[:, 0], tb[:, 1] > 0
    words = mask & (ids != CLS_ID) & (ids != SEP_ID) & (ids != PAD_ID)
    p = ARTEFACT_RATE / (1.0 + np.exp(-2.0 * z))
    artefact = words & (rng.random(ids.shape) < p[:, None])
    ids[artefact] = rng.integers(*ARTEFACT_IDS, int(artefact.sum()))
    s["text_bert"] = tb
    s["raw_text"] = np.array([" ".join(f"w{int(k)}" for k in row[1:int(m) - 1])
                              for row, m in zip(ids, mask.sum(1))], dtype=object)
    if "text" in s:
        text = s["text"].copy()
        text += (SHORTCUT_TEXT_SIGNAL * z[:, None, None] * mask[:, :, None] * u_sc).astype(np.float32)
        s["text"] = text
    return s
