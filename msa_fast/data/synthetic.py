"""Synthetic MMSA-layout datasets with a planted cross-modal signal (MOSI / MOSEI / SIMS shapes and dtypes).

``synthetic(dataset)`` returns exactly what ``pickle.load`` gives for the corresponding MMSA file:
``{"train"|"valid"|"test": {key: array}}`` with ``text_bert`` (N, 3, L_t) float32, ``text`` (N, L_t, 768) float32,
``audio`` (N, L_a, D_a) float32, ``vision`` (N, L_v, D_v) float32, ``audio_lengths`` / ``vision_lengths`` (N,) int64
(unaligned only), ``regression_labels`` (N,) float32 (+ ``_T/_A/_V`` for SIMS), ``raw_text`` and ``id`` string arrays.
Shapes come from ``msa_fast.data.specs``.

The planted signal (sample i, latents s_t, s_a, s_v ~ N(0, 1) independent):

    y = clip(quantise(scale · (0.6·s_t + 0.5·s_a + 0.4·s_v) + 0.2·scale·ε), label_range),  ε ~ N(0, 1)

with scale 1.7 (MOSI/MOSEI, labels in [-3, 3], quantised to multiples of 0.2 / 1/3 as averaged annotations are,
so exact zeros occur) or 0.55 (SIMS, [-1, 1], step 0.2). Each modality carries only its own latent, so a model that
fuses the three modalities explains ~95 % of the label variance while the best single one (text) explains ~45 %:

- audio / vision, valid frames t < length: ``x[t] = μ_m + ε_t + 0.5 · s_m · u_m`` (μ_m a fixed per-dimension offset,
  ε_t i.i.d. uniform with unit variance, u_m a fixed unit direction); padding frames are exactly 0. The masked mean over frames recovers s_m
  linearly.
- text features (``text``), valid tokens: ``x[j] = ε_j + 1.0 · s_t · u_t`` (768-d, ε as above), padding rows 0.
- text tokens (``text_bert``): each word is a sentiment word with probability 0.35, positive (ids 103..152) with
  probability sigmoid(2·s_t), else negative (ids 153..202); other words are neutral (203..999). A bag of words recovers
  s_t. ``raw_text`` holds the words ``"w<k>"`` of the ids between [CLS] (101) and [SEP] (102): word ``w<k>`` is token
  id k, [PAD] 0, [UNK] 100 — the vocabulary of the parity fixtures.
- SIMS unimodal labels: ``y_m = clip(quantise(scale · s_m + 0.2·scale·ε_m), [-1, 1])``.

Lengths are ragged and correlated like real clips: n tokens ~ round(LogNormal(log(0.4·L_t), 0.4)) clipped to
[5, L_t]; audio/vision valid frames = L · clip(n / (0.6·L_t) · U(0.7, 1.3), ·, 1) with a floor of L/8 (longer
utterances often fill the whole window). ``aligned=True`` gives the ``aligned_50`` layout (MOSI/MOSEI only): audio and
vision word-aligned to the L_t token positions by ``word_align`` and no ``*_lengths`` keys.
"""
from __future__ import annotations

import os
import pickle
from typing import Optional

import numpy as np

from .alignment import word_align
from .specs import DatasetSpec, get_dataset_spec

__all__ = ["synthetic", "save_mmsa", "CLS_ID", "SEP_ID", "UNK_ID", "PAD_ID", "POSITIVE_IDS", "NEGATIVE_IDS"]

PAD_ID, UNK_ID, CLS_ID, SEP_ID = 0, 100, 101, 102
POSITIVE_IDS = (103, 153)  # [start, stop)
NEGATIVE_IDS = (153, 203)
NEUTRAL_IDS = (203, 1000)
WEIGHTS = (0.6, 0.5, 0.4)  # label weight of s_t, s_a, s_v
FEATURE_SIGNAL = 0.5
TEXT_FEATURE_SIGNAL = 1.0  # 768 noisy dims: a stronger direction keeps it learnable from a few hundred samples
SENTIMENT_WORD_PROB = 0.35
TEXT_FEATURES_MAX_BYTES = 1 << 30  # text=None: skip the (N, L_t, 768) array when all splits together exceed this
_CHUNK = 2048


def synthetic(
    dataset: str = "mosi",
    n_train: Optional[int] = None,
    n_valid: Optional[int] = None,
    n_test: Optional[int] = None,
    seed: int = 0,
    aligned: bool = False,
    text_features: Optional[bool] = None,
    neg_inf_rate: float = 0.0,
    shared_text_space: bool = False,
) -> dict:
    """An MMSA-layout dataset dict (see the module docstring for the formula).

    Args:
        dataset: "mosi", "mosei" or "sims" (shapes, label range, unimodal labels).
        n_train, n_valid, n_test: split sizes; default the real dataset's (MOSI 1284 / 229 / 686).
        seed: everything is a function of (seed, dataset, split); splits use independent streams.
        aligned: ``aligned_50`` layout (audio/vision (N, L_t, D), no lengths keys); not for SIMS.
        text_features: include the ``text`` key (N, L_t, 768) float32. None = include unless the three splits
            together need more than 1 GiB (full-size MOSEI: 3.5 GB), to stay memory-aware.
        neg_inf_rate: fraction of valid audio entries set to -inf, as COVAREP files contain (loaders zero them).
        shared_text_space: draw the text-feature direction u_t from a dataset-independent stream, so every dataset's
            text features share one sentiment direction (as one BERT gives; the DG domains of
            ``msa_fast.data.domains`` use it). Default: a per-dataset direction, as before.
    """
    spec = get_dataset_spec(dataset)
    if aligned and not spec.aligned_available:
        raise ValueError(f"dataset {spec.name!r} has no aligned version (aligned=True)")
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    for (name, n), default in zip(sizes.items(), spec.splits):
        if n is None:
            sizes[name] = default
        elif not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n_{name} must be a non-negative int, got {n!r}")
    if not 0.0 <= neg_inf_rate <= 1.0:
        raise ValueError(f"neg_inf_rate must lie in [0, 1], got {neg_inf_rate}")
    if text_features is None:
        text_features = sum(sizes.values()) * spec.text_len * spec.text_dim * 4 <= TEXT_FEATURES_MAX_BYTES
    root = np.random.SeedSequence([int(seed), sum(map(ord, spec.name))])
    split_seeds = root.spawn(3)
    return {
        name: _make_split(spec, int(n), np.random.default_rng(ss), name, aligned, text_features, neg_inf_rate,
                          shared_text_space)
        for (name, n), ss in zip(sizes.items(), split_seeds)
    }


def _quantise(x: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    step = 1.0 / 3.0 if spec.name == "mosei" else 0.2
    lo, hi = spec.label_range
    return np.clip(np.round(x / step) * step, lo, hi).astype(np.float32)


def _label_scale(spec: DatasetSpec) -> float:
    return 0.55 if spec.label_range[1] <= 1.0 else 1.7


def _unit(rng: np.random.Generator, dim: int) -> np.ndarray:
    u = rng.standard_normal(dim)
    return (u / np.linalg.norm(u)).astype(np.float32)


def _frames(rng, n, max_len, dim, lengths, latent, offset, direction, neg_inf_rate=0.0,
            signal=FEATURE_SIGNAL) -> np.ndarray:
    """(n, max_len, dim) float32: offset + ε + signal·latent·direction on valid frames, exactly 0 after.

    ε is uniform noise with unit variance (3-4x cheaper to draw than normals) and is drawn only for valid frames.
    """
    out = np.zeros((n, max_len, dim), dtype=np.float32)
    pos = np.arange(max_len)
    half_width = np.float32(np.sqrt(3.0))  # U(-√3, √3) has variance 1
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        valid = pos[None, :] < lengths[sl, None]  # (c, L), rows of sample i come out in order
        noise = rng.random((int(valid.sum()), dim), dtype=np.float32)
        noise *= 2 * half_width
        noise -= half_width
        noise += offset
        per_row = np.repeat((signal * latent[sl]).astype(np.float32), np.minimum(lengths[sl], max_len))
        noise += per_row[:, None] * direction
        if neg_inf_rate > 0:
            noise[rng.random(noise.shape, dtype=np.float32) < neg_inf_rate] = -np.inf
        out[sl][valid] = noise
    return out


def _make_split(spec, n, rng, split, aligned, with_text, neg_inf_rate, shared_text_space=False) -> dict:
    lt, la, lv = spec.seq_lens(aligned=False)
    # fixed per-dataset "feature statistics" (same for every split of a seed: drawn from a split-independent stream)
    const = np.random.default_rng(sum(map(ord, spec.name)) + 7)
    dirs = {m: _unit(const, d) for m, d in (("text", spec.text_dim), ("audio", spec.audio_dim),
                                             ("vision", spec.vision_dim))}
    if shared_text_space:
        dirs["text"] = _unit(np.random.default_rng(7), spec.text_dim)
    offsets = {"audio": (0.5 * const.standard_normal(spec.audio_dim)).astype(np.float32),
               "vision": (0.5 * const.standard_normal(spec.vision_dim)).astype(np.float32)}

    latents = rng.standard_normal((n, 3))
    scale = _label_scale(spec)
    y = scale * (latents @ np.asarray(WEIGHTS)) + 0.2 * scale * rng.standard_normal(n)
    out: dict = {}

    # --- text tokens -------------------------------------------------------------------------------
    n_tok = np.clip(np.round(rng.lognormal(np.log(0.4 * lt), 0.4, n)), 5, lt).astype(np.int64)
    pos = np.arange(lt)[None, :]
    is_sent = rng.random((n, lt)) < SENTIMENT_WORD_PROB
    positive = rng.random((n, lt)) < 1.0 / (1.0 + np.exp(-2.0 * latents[:, :1]))
    ids = np.where(is_sent,
                   np.where(positive, rng.integers(*POSITIVE_IDS, (n, lt)), rng.integers(*NEGATIVE_IDS, (n, lt))),
                   rng.integers(*NEUTRAL_IDS, (n, lt)))
    ids[:, 0] = CLS_ID
    ids[pos == (n_tok[:, None] - 1)] = SEP_ID
    mask = pos < n_tok[:, None]
    ids[~mask] = PAD_ID
    out["text_bert"] = np.stack([ids, mask, np.zeros_like(ids)], axis=1).astype(np.float32)
    out["raw_text"] = np.array([" ".join(f"w{k}" for k in row[1:m - 1]) for row, m in zip(ids.tolist(), n_tok)],
                               dtype=object)
    if with_text:
        out["text"] = _frames(rng, n, lt, spec.text_dim, n_tok, latents[:, 0], np.float32(0.0), dirs["text"],
                              signal=TEXT_FEATURE_SIGNAL)

    # --- audio / vision ------------------------------------------------------------------------------
    for k, (m, max_len, inf_rate) in enumerate((("audio", la, neg_inf_rate), ("vision", lv, 0.0)), start=1):
        frac = np.clip(n_tok / (0.6 * lt) * rng.uniform(0.7, 1.3, n), 0.0, 1.0)
        lengths = np.clip(np.round(frac * max_len), max(1, max_len // 8), max_len).astype(np.int64)
        feats = _frames(rng, n, max_len, getattr(spec, f"{m}_dim"), lengths, latents[:, k], offsets[m], dirs[m],
                        inf_rate)
        if aligned:
            out[m] = word_align(np.nan_to_num(feats, neginf=0.0) if inf_rate else feats, lengths, n_tok, lt)
        else:
            out[m], out[f"{m}_lengths"] = feats, lengths

    # --- labels and ids -----------------------------------------------------------------------------
    out["regression_labels"] = _quantise(y, spec)
    if spec.unimodal_labels:
        for k, m in enumerate("TAV"):
            out[f"regression_labels_{m}"] = _quantise(
                scale * latents[:, k] + 0.2 * scale * rng.standard_normal(n), spec)
    out["id"] = np.array([f"syn{spec.name}_{split}_{i // 8:05d}$_${i % 8}" for i in range(n)], dtype=object)
    order = ["raw_text", "text", "text_bert", "audio", "vision", "audio_lengths", "vision_lengths", "id",
             "regression_labels", "regression_labels_T", "regression_labels_A", "regression_labels_V"]
    return {k: out[k] for k in order if k in out}


def save_mmsa(data: dict, path: str | os.PathLike) -> None:
    """Write ``data`` as an MMSA pickle (``pickle.dump`` of the dict, protocol 4 as MMSA's files)."""
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
