"""Pre-flight checks of a loaded MMSA dict against the dataset (and model) before training spends compute.

``load_mmsa`` checks that a file is well formed; this module checks that it is the *right* data for the run:

- every split (train / valid / test) is present and non-empty;
- the keys the model reads are present (``required_keys``);
- audio / vision (and ``text`` features when the model reads them) feature dims match the dataset spec, or the model's own dims
  when it was built for other features (``dims={"audio": 5, ...}``); a mismatch names the dataset the dims fit
  (``-d mosi`` run on MOSEI features: "feature dim 74 does not match mosi (5); the dims fit mosei: pass -d mosei ...");
- no NaN / inf in the features or labels (a fully non-finite modality is called out), and, given ``load_mmsa``'s
  report, how many non-finite values it zeroed (all of them = a modality without information);
- labels within the dataset's range (MOSI / MOSEI [-3, 3], SIMS [-1, 1]): an error unless ``allow_label_range``
  (``--allow-label-range``), which makes it a warning;
- token ids of ``text_bert`` within the BERT vocabulary (``vocab_size``): a file tokenised for another BERT.

Every problem is one line naming the split, the key and what was expected. The checks are vectorised numpy over the
arrays already in memory (no copies of the large feature arrays; NaN/inf detection is one float64 sum per array and
an exact chunked count only when that sum is not finite).

    errors, warnings = preflight_problems(data, "mosi", vocab_size=30522)
    warnings = preflight(data, "mosi", vocab_size=30522)   # raises PreflightError listing every error
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple, Optional

import numpy as np

from .mmsa import LABEL_KEYS
from .specs import DATASETS, DatasetSpec, get_dataset_spec

__all__ = ["preflight", "preflight_problems", "PreflightResult", "PreflightError", "DEFAULT_REQUIRED_KEYS"]

#: keys every model of msa_fast reads (models on precomputed ``text`` features add it to ``required_keys``).
DEFAULT_REQUIRED_KEYS = ("text_bert", "audio", "vision", "regression_labels")
_FEATURE_KEYS = ("text", "audio", "vision")
_LABEL_TOL = 1e-4  # float32 labels such as 3.0000002 are in range
_CHUNK = 1024


class PreflightResult(NamedTuple):
    """``(errors, warnings)``: lists of one-line messages."""

    errors: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.errors

    def raise_if_errors(self) -> None:
        if self.errors:
            raise PreflightError(self.errors, self.warnings)


class PreflightError(ValueError):
    """The data fails the pre-flight checks; ``errors`` / ``warnings`` hold the one-line messages."""

    def __init__(self, errors: list[str], warnings: Optional[list[str]] = None):
        self.errors, self.warnings = list(errors), list(warnings or [])
        n = len(self.errors)
        super().__init__(f"pre-flight check found {n} problem{'s' if n != 1 else ''} in the data (nothing was "
                         "trained):\n" + "\n".join(f"  - {e}" for e in self.errors))


def preflight_problems(
    data: Mapping[str, Mapping[str, Any]],
    dataset: str | DatasetSpec,
    *,
    dims: Optional[Mapping[str, int]] = None,
    vocab_size: Optional[int] = None,
    allow_label_range: bool = False,
    required_keys: Iterable[str] = DEFAULT_REQUIRED_KEYS,
    splits: Iterable[str] = ("train", "valid", "test"),
    load_report: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> PreflightResult:
    """Check an MMSA dict ``{split: {key: array}}`` (as ``load_mmsa`` returns it) for the run about to start.

    Args:
        data: the loaded splits.
        dataset: the dataset the run was configured for (``-d``): a name or a ``DatasetSpec``.
        dims: expected feature dims overriding the spec's, for models built for other features
            (keys ``"audio"``, ``"vision"``, ``"text"``).
        vocab_size: the BERT vocabulary size (e.g. 30522 bert-base-uncased, 21128 bert-base-chinese); ``None`` skips
            the token-id check (models that do not read ``text_bert`` ids).
        allow_label_range: labels outside the dataset's range are a warning instead of an error.
        required_keys: keys the model reads; a missing one is an error.
        splits: the splits the run uses; each must be present and non-empty.
        load_report: ``load_mmsa(..., return_report=True)``'s report, to count the NaN/inf it zeroed.

    Returns:
        ``PreflightResult(errors, warnings)``; unpacks as ``errors, warnings = ...``.
    """
    spec = dataset if isinstance(dataset, DatasetSpec) else get_dataset_spec(dataset)
    expected = {"text": spec.text_dim, "audio": spec.audio_dim, "vision": spec.vision_dim}
    overridden: set[str] = set()
    for key, value in (dims or {}).items():
        if key not in expected:
            raise ValueError(f"dims keys must be among {sorted(expected)}, got {key!r}")
        if value is not None:
            expected[key] = int(value)
            overridden.add(key)
    if vocab_size is not None and int(vocab_size) <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    required = tuple(required_keys)
    errors: list[str] = []
    warnings: list[str] = []
    dim_mismatch: dict[tuple[str, int], list[str]] = {}  # (key, found dim) → splits: one line for all splits

    if not isinstance(data, Mapping):
        return PreflightResult([f"data: expected a dict of splits, found {type(data).__name__}"], [])
    for split in splits:
        if split not in data:
            errors.append(f"split {split!r}: missing (found splits {sorted(map(str, data))}); the run needs it")
            continue
        s = data[split]
        if not isinstance(s, Mapping):
            errors.append(f"split {split!r}: expected a dict of arrays, found {type(s).__name__}")
            continue
        n = _n_samples(s)
        if not n:
            errors.append(f"split {split!r}: empty (0 samples); training, model selection and testing each need a "
                          "non-empty split")
            continue
        for key in required:
            if key not in s:
                errors.append(f"split {split!r}, key {key!r}: missing; the model reads it (found keys "
                              f"{sorted(map(str, s))})")
        report = (load_report or {}).get(split) or {}
        for key in _FEATURE_KEYS:
            if key in s and (key != "text" or "text" in required or "text" in overridden):  # unused text: skip
                _check_features(s, split, key, expected[key], report, dim_mismatch, errors, warnings)
        for key in LABEL_KEYS:
            if key in s:
                _check_labels(np.asarray(s[key]), split, key, spec, allow_label_range, errors, warnings)
        if vocab_size is not None and "text_bert" in s:
            _check_token_ids(np.asarray(s["text_bert"]), split, int(vocab_size), errors)
    for (key, dim), bad_splits in dim_mismatch.items():
        where = (f"split {bad_splits[0]!r}" if len(bad_splits) == 1
                 else "splits " + ", ".join(map(repr, bad_splits))) + f", key {key!r}"
        if key in overridden:
            errors.append(f"{where}: feature dim {dim} does not match the model's {key} dim ({expected[key]}); "
                          f"build the model with {key} dim {dim} or use {expected[key]}-dim {key} features")
            continue
        fits = [name for name in _fitting_datasets(key, dim) if name != spec.name]
        hint = f"the dims fit {' / '.join(fits)}: pass -d {fits[0]}, or " if fits else "pass the right -d, or "
        errors.append(f"{where}: feature dim {dim} does not match {spec.name} ({expected[key]}); {hint}build the "
                      f"model with {key} dim {dim} if these are other features")
    return PreflightResult(errors, warnings)


def preflight(data: Mapping[str, Mapping[str, Any]], dataset: str | DatasetSpec, **kwargs) -> list[str]:
    """``preflight_problems`` that raises ``PreflightError`` (all errors, one per line) and returns the warnings."""
    result = preflight_problems(data, dataset, **kwargs)
    result.raise_if_errors()
    return result.warnings


# ---- helpers ----------------------------------------------------------------------------------------------
def _n_samples(s: Mapping[str, Any]) -> Optional[int]:
    for key in ("regression_labels", "text_bert", "audio", "vision", "text", "id", "raw_text"):
        if key in s:
            shape = np.shape(s[key])
            return int(shape[0]) if shape else 0
    return None


def _fmt(x: float) -> str:
    return f"{float(x):g}"


def _count_nonfinite(arr: np.ndarray) -> int:
    """Number of NaN/±inf entries; one float64 sum when there are none, an exact chunked count otherwise."""
    if arr.size == 0 or not np.issubdtype(arr.dtype, np.inexact):
        return 0
    if np.isfinite(arr.sum(dtype=np.complex128 if np.iscomplexobj(arr) else np.float64)):
        return 0
    if arr.ndim == 0:
        return int(not np.isfinite(arr))
    return sum(int(np.count_nonzero(~np.isfinite(arr[i:i + _CHUNK]))) for i in range(0, arr.shape[0], _CHUNK))


def _valid_values(s: Mapping[str, Any], key: str, arr: np.ndarray) -> int:
    """Entries inside the valid frames (``*_lengths``), else all entries."""
    lengths = s.get(f"{key}_lengths")
    if lengths is None or arr.ndim != 3:
        return int(arr.size)
    try:
        lengths = np.asarray(lengths).reshape(-1)
        if lengths.shape[0] != arr.shape[0] or not np.issubdtype(lengths.dtype, np.number):
            return int(arr.size)
        return int(np.clip(lengths, 0, arr.shape[1]).sum()) * int(arr.shape[2])
    except (TypeError, ValueError):
        return int(arr.size)


def _fitting_datasets(key: str, dim: int) -> list[str]:
    return [name for name, sp in DATASETS.items() if getattr(sp, f"{key}_dim") == dim]


def _check_features(s, split, key, exp_dim, report, dim_mismatch, errors, warnings) -> None:
    arr = np.asarray(s[key])
    where = f"split {split!r}, key {key!r}"
    if arr.ndim != 3 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        errors.append(f"{where}: expected (N, L, D) numeric features, found shape {tuple(arr.shape)} dtype "
                      f"{arr.dtype}")
        return
    dim = int(arr.shape[2])
    if dim != exp_dim:
        dim_mismatch.setdefault((key, dim), []).append(split)
    total = _valid_values(s, key, arr)
    bad = _count_nonfinite(arr)
    if bad:
        if bad >= total:
            errors.append(f"{where}: all {total} values are NaN/inf (the modality carries no information); "
                          "expected finite features")
        else:
            errors.append(f"{where}: {bad} of {total} values are NaN/inf; expected finite features (load_mmsa zeroes "
                          "NaN/inf in audio/vision as MMSA does)")
        return
    zeroed = int(report.get(f"{key}_nonfinite", 0) or 0)
    if zeroed and zeroed >= total:
        errors.append(f"{where}: all {total} values were NaN/inf in the file (zeroed on load): the modality carries "
                      "no information; expected finite features")
        return
    if zeroed:
        warnings.append(f"{where}: {zeroed} of {total} values were NaN/inf in the file and were zeroed on load "
                        "(as MMSA does)")
    if arr.size and not arr.any():
        warnings.append(f"{where}: every value is 0 (a missing or blanked modality?); expected features")


def _check_labels(labels, split, key, spec, allow, errors, warnings) -> None:
    where = f"split {split!r}, key {key!r}"
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.number):
        return  # shape/dtype problems are load_mmsa's (or the empty-split check's)
    labels = labels.reshape(-1)
    finite = np.isfinite(labels)
    if not finite.all():
        errors.append(f"{where}: {int((~finite).sum())} of {labels.size} labels are NaN/inf; expected finite labels")
        labels = labels[finite]
        if labels.size == 0:
            return
    lo, hi = spec.label_range
    outside = (labels < lo - _LABEL_TOL) | (labels > hi + _LABEL_TOL)
    n_out = int(outside.sum())
    if not n_out:
        return
    lmin, lmax = float(labels.min()), float(labels.max())
    fits = [name for name, sp in DATASETS.items()
            if name != spec.name and sp.label_range[0] - _LABEL_TOL <= lmin and lmax <= sp.label_range[1] + _LABEL_TOL]
    hint = f"the labels fit {' / '.join(fits)} (pass -d {fits[0]}?); " if fits else ""
    msg = (f"{where}: {n_out} of {labels.size} labels outside {spec.name}'s range [{_fmt(lo)}, {_fmt(hi)}] "
           f"(found [{_fmt(lmin)}, {_fmt(lmax)}])")
    if allow:
        warnings.append(f"{msg}; training anyway (allow_label_range)")
    else:
        errors.append(f"{msg}; {hint}pass allow_label_range=True / --allow-label-range to train anyway")


def _check_token_ids(tb, split, vocab_size, errors) -> None:
    where = f"split {split!r}, key 'text_bert'"
    if tb.ndim != 3 or tb.shape[1] != 3 or not np.issubdtype(tb.dtype, np.number):
        errors.append(f"{where}: expected (N, 3, L_t) ids / mask / segments, found shape {tuple(tb.shape)} dtype "
                      f"{tb.dtype}")
        return
    ids = tb[:, 0]
    if ids.size == 0:
        return
    bad = ~np.isfinite(ids) | (ids < 0) | (ids >= vocab_size)
    n_bad = int(bad.sum())
    if n_bad:
        finite = ids[np.isfinite(ids)]
        rng = f"ids in [{_fmt(finite.min())}, {_fmt(finite.max())}]" if finite.size else "no finite ids"
        errors.append(f"{where}: {n_bad} token ids outside the BERT vocabulary [0, {vocab_size}) (found {rng}); "
                      "the text was tokenised for another BERT (bert-base-uncased has 30522 ids, bert-base-chinese "
                      "21128): use the matching pretrained model")
