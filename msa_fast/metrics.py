"""MMSA's regression metrics with MMSA's names and definitions (``MMSA/utils/metricsTop.py``), NumPy only.

MOSI / MOSEI (``compute_metrics(pred, truth, "mosi")``):

- ``Has0_acc_2`` / ``Has0_F1_score``: (p >= 0) vs (t >= 0) over all samples (a 0 label counts as positive).
- ``Non0_acc_2`` / ``Non0_F1_score``: (p > 0) vs (t > 0) over the samples with t != 0 (exact comparison).
- ``Mult_acc_7`` / ``Mult_acc_5``: equality of ``np.round`` (half to even) of p and t clipped to ±3 / ±2.
- ``MAE`` = mean |p - t|, ``Corr`` = Pearson correlation, both on the **unclipped** values.

SIMS / SIMSv2 (``dataset="sims"``): p and t are clipped to [-1, 1] first; ``Mult_acc_2/3/5`` bin them with the
lower-open, upper-closed edges [-1.01, 0, 1.01], [-1.01, -0.1, 0.1, 1.01], [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01];
``F1_score`` is the weighted F1 of the 2-class bins; ``MAE`` / ``Corr`` use the clipped values.

Weighted F1 = per-class F1 averaged with the class supports **of the truths** (sklearn's
``f1_score(truth, pred, average="weighted")``; the argument order matters). Classes are the union of the labels in
truth and prediction; a class without predicted or true members has F1 0 (sklearn's ``zero_division`` value).

Every value is rounded with Python ``round(x, 4)`` as MMSA does (``round_digits=None`` keeps full precision).
Edge cases are reported explicitly instead of warning: a constant prediction or truth makes ``Corr`` NaN, and an empty
subset (no t != 0) makes the Non0 values NaN.

Float32 inputs are binned in float32, as MMSA does on the float32 tensors it receives (a bin edge such as 0.1 is
compared in the input's precision); ``MAE`` and ``Corr`` are accumulated in float64.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "MOSI_METRICS",
    "SIMS_METRICS",
    "compute_metrics",
    "get_metrics",
    "weighted_f1",
    "pearson",
    "results_row",
    "write_results_csv",
]

MOSI_METRICS = (
    "Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5", "Mult_acc_7", "MAE", "Corr",
)
SIMS_METRICS = ("Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr")

_SIMS_EDGES = {
    2: (-1.01, 0.0, 1.01),
    3: (-1.01, -0.1, 0.1, 1.01),
    5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01),
}
_DATASET_FAMILY = {"mosi": "mosi", "mosei": "mosi", "sims": "sims", "simsv2": "sims"}


def _as_array(x, name: str) -> np.ndarray:
    """Flatten a tensor / array / sequence to a 1-D float array (float32 kept, other dtypes → float64)."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x).reshape(-1)
    if arr.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    return arr


def weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """Support-weighted F1 over the classes in ``truth ∪ pred`` (supports from ``truth``); NaN when empty.

    Equals ``sklearn.metrics.f1_score(truth, pred, average="weighted")`` (zero_division → 0).
    """
    truth = np.asarray(truth).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    if truth.shape != pred.shape:
        raise ValueError(f"truth and pred must have the same length, got {truth.shape[0]} and {pred.shape[0]}")
    if truth.size == 0:
        return float("nan")
    classes = np.union1d(truth, pred)
    t = truth[None, :] == classes[:, None]  # (C, N)
    p = pred[None, :] == classes[:, None]
    tp = (t & p).sum(axis=1).astype(np.float64)
    support = t.sum(axis=1).astype(np.float64)
    predicted = p.sum(axis=1).astype(np.float64)
    denom = support + predicted  # 2TP + FP + FN
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float((f1 * support).sum() / support.sum())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation in float64; NaN (no warning) when either input is constant or has < 2 values."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    if denom == 0.0 or not math.isfinite(denom):
        return float("nan")
    return float(np.clip((da * db).sum() / denom, -1.0, 1.0))


def _accuracy(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a == b)) if a.size else float("nan")


def _round(results: dict[str, float], digits: int | None) -> dict[str, float]:
    if digits is None:
        return {k: float(v) for k, v in results.items()}
    return {k: round(float(v), digits) for k, v in results.items()}


def _mosi_metrics(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    non0 = t != 0
    results = {
        "Has0_acc_2": _accuracy(p >= 0, t >= 0),
        "Has0_F1_score": weighted_f1(t >= 0, p >= 0),
        "Non0_acc_2": _accuracy(p[non0] > 0, t[non0] > 0),
        "Non0_F1_score": weighted_f1(t[non0] > 0, p[non0] > 0),
        "Mult_acc_5": _accuracy(np.round(np.clip(p, -2.0, 2.0)), np.round(np.clip(t, -2.0, 2.0))),
        "Mult_acc_7": _accuracy(np.round(np.clip(p, -3.0, 3.0)), np.round(np.clip(t, -3.0, 3.0))),
        "MAE": float(np.mean(np.abs(p - t), dtype=np.float64)),
        "Corr": pearson(p, t),
    }
    return results


def _sims_bins(x: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Class i where edges[i] < x <= edges[i+1] (values are already clipped to [-1, 1])."""
    out = np.full(x.shape, -1, dtype=np.int64)
    for i in range(len(edges) - 1):
        out[(x > x.dtype.type(edges[i])) & (x <= x.dtype.type(edges[i + 1]))] = i
    return out


def _sims_metrics(p: np.ndarray, t: np.ndarray) -> dict[str, float]:
    p = np.clip(p, -1.0, 1.0)
    t = np.clip(t, -1.0, 1.0)
    bins = {k: (_sims_bins(p, e), _sims_bins(t, e)) for k, e in _SIMS_EDGES.items()}
    return {
        "Mult_acc_2": _accuracy(*bins[2]),
        "Mult_acc_3": _accuracy(*bins[3]),
        "Mult_acc_5": _accuracy(*bins[5]),
        "F1_score": weighted_f1(bins[2][1], bins[2][0]),
        "MAE": float(np.mean(np.abs(p - t), dtype=np.float64)),
        "Corr": pearson(p, t),
    }


def compute_metrics(pred, truth, dataset: str = "mosi", round_digits: int | None = 4) -> dict[str, float]:
    """MMSA regression metrics of ``pred`` against ``truth`` (any shape, flattened; tensors or arrays).

    Returns ``{name: value}`` with the names of ``MOSI_METRICS`` (mosi, mosei) or ``SIMS_METRICS`` (sims, simsv2).
    """
    family = _DATASET_FAMILY.get(str(dataset).lower())
    if family is None:
        raise ValueError(f"dataset must be one of {sorted(_DATASET_FAMILY)}, got {dataset!r}")
    p = _as_array(pred, "pred")
    t = _as_array(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred and truth must have the same number of values, got {p.size} and {t.size}")
    if p.size == 0:
        raise ValueError("pred and truth are empty")
    if p.dtype != t.dtype:  # compare in the wider precision
        p, t = p.astype(np.float64), t.astype(np.float64)
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("pred and truth must be finite (found NaN or inf)")
    results = _mosi_metrics(p, t) if family == "mosi" else _sims_metrics(p, t)
    return _round(results, round_digits)


def get_metrics(dataset: str, round_digits: int | None = 4) -> Callable[..., dict[str, float]]:
    """``MetricsTop(...).getMetics(dataset)`` equivalent: a function ``(pred, truth) -> dict``."""
    if str(dataset).lower() not in _DATASET_FAMILY:
        raise ValueError(f"dataset must be one of {sorted(_DATASET_FAMILY)}, got {dataset!r}")

    def metrics(pred, truth) -> dict[str, float]:
        return compute_metrics(pred, truth, dataset=dataset, round_digits=round_digits)

    return metrics


def results_row(runs: Iterable[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """Aggregate per-seed metric dicts as MMSA's results CSV: ``name -> (round(mean·100, 2), round(std·100, 2))``.

    The std is NumPy's population std (ddof 0), as MMSA. MAE and Corr are scaled by 100 too (CSV MAE 71.3 = 0.713).
    NaN values propagate (a NaN in any run gives NaN).
    """
    runs = list(runs)
    if not runs:
        raise ValueError("runs must hold at least one metric dict")
    names = list(runs[0])
    for i, r in enumerate(runs):
        if set(r) != set(names):
            raise ValueError(f"run {i} has metrics {sorted(r)}, expected {sorted(names)}")
    out = {}
    for name in names:
        values = np.asarray([r[name] for r in runs], dtype=np.float64)
        out[name] = (round(float(np.mean(values)) * 100, 2), round(float(np.std(values)) * 100, 2))
    return out


def write_results_csv(path: str | os.PathLike, model: str, rows: dict[str, tuple[float, float]],
                      info: Mapping[str, str] | None = None) -> None:
    """Write the ``Model, [info...,] metric...`` row of ``model`` (cells ``"(mean, std)"``) into ``path``, with the
    header if new.

    One row per model, as MMSA's table: other models' rows are kept, a row of the same model is replaced (re-running
    or resuming a run never duplicates it). ``info`` adds descriptive columns after ``Model`` (the DG protocol's
    source, target, text encoder, scales) that are part of a row's identity: a row is replaced only when the model
    and every info value match. An existing file must have the same columns (ValueError otherwise). The file is
    rewritten through a temporary file + ``os.replace``.
    """
    info = dict(info or {})
    header = ["Model", *info, *rows]
    key = [model, *(str(v) for v in info.values())]
    kept: list[list[str]] = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            found = list(csv.reader(f))
        if found[0] != header:
            raise ValueError(f"{path}: existing columns {found[0]} differ from {header}")
        kept = [r for r in found[1:] if r and r[:len(key)] != key]
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([header, *kept, [*key, *(f"({m}, {s})" for m, s in rows.values())]])
    os.replace(tmp, path)
