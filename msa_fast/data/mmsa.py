"""Reader and validator of MMSA processed pickles (``aligned_50.pkl``, ``unaligned_50.pkl``, ``unaligned_39.pkl``).

``load_mmsa`` returns the file's structure unchanged — ``{split: {key: array}}`` with MMSA's key names — after
checking every key it knows (shape, dtype, N equal across keys, lengths within [0, L], finite labels, right
padding). A malformed file raises **one** ``ValueError`` naming the split, the key, what was expected and what was
found. Conversions (all documented, all counted in the optional report):

- float features (``text``, ``audio``, ``vision``) become float32 (MMSA's and LNLN's loaders do ``astype(float32)``);
- non-finite audio/vision values (``-inf`` from COVAREP, also NaN / +inf) become 0 as MMSA's loader does for
  ``-inf``; their number per key is in the report;
- ``regression_labels*`` of shape (N, 1) become (N,) float32 (consumers ``reshape(-1)``);
- ``audio_lengths`` / ``vision_lengths`` become int64; aligned files have none, so they are filled with the full
  length L (every frame valid);
- left-padded audio/vision (valid frames last, reported for MulT-era pickles) is detected and shifted to MMSA's
  right padding when ``padding="auto"``; data that is neither raises.

Unknown keys (``annotations``, ``classification_labels``, ``prompt``, ...) are passed through untouched.

Files are unpickled by ``msa_fast.data.safe_pickle.safe_load``: only numpy arrays / dtypes / scalars and builtin
containers are admitted, a pickle naming any other global (code) raises ``UnsafePickleError``; ``trusted=True``
(``--trust-pickle``) uses Python's full unpickler for files you trust.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Literal, Mapping

import numpy as np

from .safe_pickle import UnsafePickleError, safe_load

__all__ = ["load_mmsa", "validate_split", "FEATURE_KEYS", "LABEL_KEYS", "PER_SAMPLE_KEYS"]

FEATURE_KEYS = ("audio", "vision")
LABEL_KEYS = ("regression_labels", "regression_labels_T", "regression_labels_A", "regression_labels_V")
STRING_KEYS = ("raw_text", "id", "prompt")
PER_SAMPLE_KEYS = ("text_bert", "text", *FEATURE_KEYS, "audio_lengths", "vision_lengths", *LABEL_KEYS, *STRING_KEYS)
REQUIRED_KEYS = ("text_bert", "audio", "vision", "regression_labels")
_CHUNK = 1024  # rows per chunk for the memory-hungry whole-array checks (MOSEI vision is 0.3 GB)

Padding = Literal["auto", "right", "left", "ignore"]


def load_mmsa(
    path_or_dict: str | os.PathLike | Mapping[str, Any],
    splits: Iterable[str] = ("train", "valid", "test"),
    padding: Padding = "auto",
    return_report: bool = False,
    *,
    trusted: bool = False,
):
    """Read and validate an MMSA pickle (path) or an already loaded dict.

    Args:
        path_or_dict: path of the pickle, or ``{split: {key: array}}``.
        splits: the splits to read and validate (others are dropped).
        padding: ``"auto"`` = frames at or beyond ``*_lengths`` must be zero; if they are not but the data is
            consistently left-padded, it is shifted to right padding; ``"right"`` = require right padding;
            ``"left"`` = the file is left-padded, shift it; ``"ignore"`` = no check (frames beyond the length are
            kept as they are).
        trusted: unpickle with Python's full unpickler. By default only data (numpy arrays, builtin containers)
            is admitted and a pickle naming any other global raises ``UnsafePickleError`` (see
            ``msa_fast.data.safe_pickle``): a pickle can run code when loaded, so pass ``True`` only for files you
            trust (``--trust-pickle`` on the command line).
        return_report: also return ``{split: {"n": N, "audio_nonfinite": count, "vision_nonfinite": count,
            "audio_padding": "right"|"left"|"full"|"unchecked", ...}}``.

    Returns:
        ``{split: {key: np.ndarray | list}}`` with MMSA's keys; with ``return_report`` a ``(data, report)`` tuple.

    Raises:
        FileNotFoundError: no such file. UnsafePickleError (a ValueError): the pickle references code, not data
        (and ``trusted`` is false). ValueError: anything malformed (one line naming split and key).
    """
    if padding not in ("auto", "right", "left", "ignore"):
        raise ValueError(f"padding must be 'auto', 'right', 'left' or 'ignore', got {padding!r}")
    raw = _read(path_or_dict, trusted)
    splits = tuple(splits)
    if not splits:
        raise ValueError("splits must name at least one split")
    data, report = {}, {}
    for split in splits:
        if split not in raw:
            raise ValueError(f"split {split!r}: missing from the file (found splits {sorted(map(str, raw))})")
        data[split], report[split] = validate_split(raw[split], split, padding=padding)
    return (data, report) if return_report else data


def _read(path_or_dict, trusted: bool = False) -> Mapping[str, Any]:
    if isinstance(path_or_dict, Mapping):
        return path_or_dict
    if not isinstance(path_or_dict, (str, os.PathLike)):
        raise TypeError(f"path_or_dict must be a path or a dict, got {type(path_or_dict).__name__}")
    path = os.fspath(path_or_dict)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    raw = read_pickle(path, trusted)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a dict of splits, found {type(raw).__name__}")
    return raw


def read_pickle(path: str, trusted: bool = False) -> Any:
    """``safe_load`` a pickle file; unreadable files raise one ``ValueError`` line (``UnsafePickleError`` as is)."""
    try:
        return safe_load(path, trusted=trusted)
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated file, not a pickle, missing class, ...
        raise ValueError(f"{path}: cannot read the pickle ({type(err).__name__}: {err})") from None


def _fail(split: str, key: str, expected: str, found: str) -> ValueError:
    return ValueError(f"split {split!r}, key {key!r}: expected {expected}, found {found}")


def _describe(x) -> str:
    if isinstance(x, np.ndarray):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of length {len(x)}"
    return type(x).__name__


def _to_array(x, split: str, key: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor in a hand-built dict
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as err:
        raise _fail(split, key, "an array", f"{type(x).__name__} ({err})") from None
    if arr.dtype == object:
        raise _fail(split, key, "a numeric array", f"{_describe(arr)} (ragged or non-numeric)")
    return arr


def _numeric(arr: np.ndarray, split: str, key: str, ndim: int, expected: str) -> None:
    if arr.ndim != ndim or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise _fail(split, key, expected, _describe(arr))


def validate_split(split_data: Mapping[str, Any], split: str, padding: Padding = "auto"):
    """Validate one split; returns ``(validated dict, report dict)`` (see ``load_mmsa``)."""
    if not isinstance(split_data, Mapping):
        raise ValueError(f"split {split!r}: expected a dict of arrays, found {type(split_data).__name__}")
    for key in REQUIRED_KEYS:
        if key not in split_data:
            raise ValueError(f"split {split!r}: required key {key!r} is missing (found {sorted(map(str, split_data))})")
    out: dict[str, Any] = dict(split_data)  # unknown keys pass through
    report: dict[str, Any] = {}

    # --- text_bert (N, 3, L_t): ids, attention mask, segment ids -----------------------------------
    tb = _to_array(split_data["text_bert"], split, "text_bert")
    _numeric(tb, split, "text_bert", 3, "(N, 3, L_t) numeric")
    if tb.shape[1] != 3:
        raise _fail(split, "text_bert", "(N, 3, L_t) numeric", _describe(tb))
    n, _, text_len = tb.shape
    if not np.isfinite(tb).all() or (tb != np.round(tb)).any() or (tb < 0).any():
        raise _fail(split, "text_bert", "non-negative integer values (ids, mask, segments)", "other values")
    mask = tb[:, 1]
    if not np.isin(mask, (0, 1)).all():
        raise _fail(split, "text_bert", "attention mask row text_bert[:, 1] in {0, 1}", f"values {np.unique(mask)[:5]}")
    if (np.diff(mask, axis=1) > 0).any():
        bad = int(np.nonzero((np.diff(mask, axis=1) > 0).any(axis=1))[0][0])
        raise _fail(split, "text_bert", "right-padded attention masks (1s then 0s)", f"a gap in sample {bad}")
    out["text_bert"] = tb
    report["n"] = n
    report["text_lengths"] = mask.sum(axis=1).astype(np.int64)

    # --- optional precomputed BERT features (N, L_t, D_t) --------------------------------------------
    if "text" in split_data:
        text = _to_array(split_data["text"], split, "text")
        _numeric(text, split, "text", 3, f"({n}, {text_len}, D_t) float")
        if text.shape[:2] != (n, text_len):
            raise _fail(split, "text", f"({n}, {text_len}, D_t) float", _describe(text))
        if not np.isfinite(text).all():
            raise _fail(split, "text", "finite values", "NaN or inf")
        out["text"] = text.astype(np.float32, copy=False)

    # --- audio / vision (N, L, D) + lengths -------------------------------------------------------
    for key in FEATURE_KEYS:
        feats = _to_array(split_data[key], split, key)
        _numeric(feats, split, key, 3, f"({n}, L, D) float")
        if feats.shape[0] != n:
            raise _fail(split, key, f"({n}, L, D) float (N of text_bert)", _describe(feats))
        feats = np.array(feats, dtype=np.float32, copy=True)  # our own copy: the caller's arrays stay untouched
        report[f"{key}_nonfinite"] = _zero_nonfinite(feats)
        lkey = f"{key}_lengths"
        max_len = feats.shape[1]
        if lkey in split_data:
            lengths = _to_array(split_data[lkey], split, lkey).reshape(-1) if np.ndim(split_data[lkey]) else None
            if lengths is None or lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.number):
                raise _fail(split, lkey, f"({n},) integers", _describe(np.asarray(split_data[lkey])))
            if not np.isfinite(lengths).all() or (lengths != np.round(lengths)).any():
                raise _fail(split, lkey, "integer values", "non-integer values")
            lengths = lengths.astype(np.int64)
            if lengths.min(initial=0) < 0 or lengths.max(initial=0) > max_len:
                raise _fail(split, lkey, f"values in [0, {max_len}]",
                            f"range [{lengths.min()}, {lengths.max()}]")
            feats, report[f"{key}_padding"] = _check_padding(feats, lengths, padding, split, key)
        else:  # aligned file: every frame is valid
            lengths = np.full(n, max_len, dtype=np.int64)
            report[f"{key}_padding"] = "full"
        out[key], out[lkey] = feats, lengths

    # --- labels (N,) finite ---------------------------------------------------------------------------
    for key in LABEL_KEYS:
        if key not in split_data:
            continue
        labels = _to_array(split_data[key], split, key)
        if not np.issubdtype(labels.dtype, np.number) or labels.size != n or labels.ndim not in (1, 2) or (
            labels.ndim == 2 and labels.shape[1] != 1
        ):
            raise _fail(split, key, f"({n},) or ({n}, 1) float", _describe(labels))
        labels = labels.reshape(n).astype(np.float32)
        if not np.isfinite(labels).all():
            raise _fail(split, key, "finite labels", f"{int((~np.isfinite(labels)).sum())} NaN/inf values")
        out[key] = labels

    # --- per-sample strings ---------------------------------------------------------------------------
    for key in STRING_KEYS:
        if key not in split_data:
            continue
        values = split_data[key]
        if isinstance(values, np.ndarray):
            values = values.reshape(-1).tolist() if values.ndim <= 1 else None
        elif isinstance(values, tuple):
            values = list(values)
        if not isinstance(values, list) or len(values) != n:
            raise _fail(split, key, f"{n} strings", _describe(split_data[key]))
        if not all(isinstance(v, str) for v in values):
            bad = next(type(v).__name__ for v in values if not isinstance(v, str))
            raise _fail(split, key, f"{n} strings", f"an element of type {bad}")
        out[key] = split_data[key]  # unchanged (MMSA stores numpy string arrays)
    return out, report


def _zero_nonfinite(feats: np.ndarray) -> int:
    """Set NaN / ±inf to 0 in place (MMSA: ``audio[audio == -inf] = 0``); returns how many there were."""
    count = 0
    for start in range(0, feats.shape[0], _CHUNK):
        chunk = feats[start:start + _CHUNK]
        bad = ~np.isfinite(chunk)
        c = int(bad.sum())
        if c:
            chunk[bad] = 0.0
            count += c
    return count


def _nonzero_frames(feats: np.ndarray) -> np.ndarray:
    """(N, L) bool: frame has a non-zero feature (chunked to bound temporaries)."""
    out = np.empty(feats.shape[:2], dtype=bool)
    for start in range(0, feats.shape[0], _CHUNK):
        out[start:start + _CHUNK] = (feats[start:start + _CHUNK] != 0).any(axis=2)
    return out


def _check_padding(feats: np.ndarray, lengths: np.ndarray, padding: Padding, split: str, key: str):
    """Verify right padding (frames >= length are zero); detect/convert left padding. Returns (feats, kind)."""
    if padding == "ignore":
        return feats, "unchecked"
    n, max_len = feats.shape[:2]
    nonzero = _nonzero_frames(feats)
    pos = np.arange(max_len)[None, :]
    right_bad = (nonzero & (pos >= lengths[:, None])).any(axis=1)
    left_bad = (nonzero & (pos < (max_len - lengths)[:, None])).any(axis=1)
    if padding == "right" or (padding == "auto" and not right_bad.any()):
        if right_bad.any():
            i = int(np.nonzero(right_bad)[0][0])
            raise _fail(split, key, f"zero frames at and beyond {key}_lengths (right padding)",
                        f"{int(right_bad.sum())} samples with non-zero padding, first sample {i} "
                        f"(length {lengths[i]}, last non-zero frame {int(np.nonzero(nonzero[i])[0][-1])}); "
                        "padding='ignore' skips this check")
        return feats, "right"
    if left_bad.any():
        i = int(np.nonzero(left_bad & right_bad)[0][0]) if (left_bad & right_bad).any() else int(
            np.nonzero(left_bad)[0][0])
        allowed = "right or left" if padding == "auto" else "left"
        raise _fail(split, key, f"zero padding frames ({allowed} padding for {key}_lengths)",
                    f"{int(right_bad.sum())} samples non-zero beyond their length and {int(left_bad.sum())} "
                    f"non-zero before L - length, e.g. sample {i} (length {lengths[i]} of {max_len}); "
                    "padding='ignore' skips this check")
    # left padded: valid frames are [L - len, L); move them to [0, len)
    src = (pos + (max_len - lengths)[:, None]) % max_len  # (N, L)
    shifted = np.take_along_axis(feats, src[:, :, None], axis=1)
    shifted[pos.repeat(n, 0) >= lengths[:, None]] = 0.0
    return shifted, "left"
