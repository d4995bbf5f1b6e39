"""MAG-BERT list-of-tuples pickles (the layout HME reads) ↔ MMSA dicts (spec data_and_metrics.md §2).

MAG layout: ``{"train"|"dev"|"test": [((words, visual, acoustic), label, segment), ...]}`` with ``words`` list[str],
``visual`` (T, D_v) and ``acoustic`` (T, D_a) word-aligned (T = number of words), ``label`` array-like float,
``segment`` the clip id.

``read_mag`` applies HME's processing (``convert_to_features`` / ``prepare_bert_input``): −inf → 0 in the features;
every word tokenised and the word pieces concatenated; tokens truncated to ``max_seq_length − 2``, feature rows
truncated to the same count (rows are per word, tokens per word piece, so they may no longer line up — a MAG quirk
kept as is); [CLS] + tokens + [SEP]; a zero feature row before and after; everything zero-padded to
``max_seq_length``; ``input_mask`` 1 on real tokens, ``segment_ids`` 0. The result is an MMSA ``aligned_50``-style dict
(split ``dev`` → ``valid``, no ``*_lengths``) validated by ``load_mmsa``.

Tokenisation: pass ``tokenize(word) -> list[int]`` (e.g. a Hugging Face tokenizer's
``lambda w: tok.encode(w, add_special_tokens=False)``); the default understands the synthetic vocabulary
(word ``"w<k>"`` → id k) of ``msa_fast.data.synthetic`` and the parity fixtures, and rejects other words.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from .mmsa import load_mmsa, read_pickle
from .synthetic import CLS_ID, SEP_ID

__all__ = ["read_mag", "to_mag", "synthetic_vocab_tokenize"]

_SPLIT_TO_MMSA = {"train": "train", "dev": "valid", "test": "test"}
_WORD = re.compile(r"w(\d+)")


def synthetic_vocab_tokenize(word: str) -> list[int]:
    """``"w<k>"`` → [k] (the synthetic / parity-fixture vocabulary)."""
    match = _WORD.fullmatch(word)
    if match is None:
        raise ValueError(f"word {word!r} is not in the synthetic vocabulary ('w<k>'); pass tokenize= "
                         "(e.g. a BERT tokenizer's encode without special tokens)")
    return [int(match.group(1))]


def read_mag(path_or_dict: str | os.PathLike | Mapping[str, Any], splits: Iterable[str] = ("train", "dev", "test"),
             tokenize: Optional[Callable[[str], list[int]]] = None, max_seq_length: int = 50, *,
             trusted: bool = False) -> dict:
    """Read a MAG-BERT pickle (path or dict) into a validated MMSA dict ``{train, valid, test}``.

    ``trusted``: unpickle with Python's full unpickler; by default only data globals are admitted and anything else
    raises ``UnsafePickleError`` (``msa_fast.data.safe_pickle``). Pass ``True`` only for files you trust.
    """
    if isinstance(path_or_dict, Mapping):
        raw = path_or_dict
    else:
        path = os.fspath(path_or_dict)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file: {path}")
        raw = read_pickle(path, trusted)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{path}: expected a dict of splits, found {type(raw).__name__}")
    tokenize = tokenize or synthetic_vocab_tokenize
    if max_seq_length < 3:
        raise ValueError(f"max_seq_length must be >= 3, got {max_seq_length}")
    out = {}
    for split in splits:
        if split not in raw:
            raise ValueError(f"split {split!r}: missing from the MAG file (found {sorted(map(str, raw))})")
        out[_SPLIT_TO_MMSA.get(split, split)] = _convert_split(raw[split], split, tokenize, max_seq_length)
    return load_mmsa(out, splits=tuple(out))


def _features(x, split: str, i: int, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"split {split!r}, sample {i}, {name}: expected (T, D) features, found shape {arr.shape}")
    return np.where(np.isneginf(arr), np.float32(0.0), arr)


def _convert_split(rows, split: str, tokenize, max_len: int) -> dict:
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"split {split!r}: expected a non-empty list of ((words, visual, acoustic), label, segment)")
    n = len(rows)
    ids = np.zeros((n, max_len), dtype=np.float32)
    mask = np.zeros((n, max_len), dtype=np.float32)
    visual = acoustic = None
    labels = np.zeros(n, dtype=np.float32)
    raw_text, seg_ids = [], []
    for i, row in enumerate(rows):
        try:
            (words, v, a), label, segment = row
        except (TypeError, ValueError):
            raise ValueError(f"split {split!r}, sample {i}: expected ((words, visual, acoustic), label, segment)") \
                from None
        v, a = _features(v, split, i, "visual"), _features(a, split, i, "acoustic")
        if visual is None:
            visual = np.zeros((n, max_len, v.shape[1]), dtype=np.float32)
            acoustic = np.zeros((n, max_len, a.shape[1]), dtype=np.float32)
        if v.shape[1] != visual.shape[2] or a.shape[1] != acoustic.shape[2]:
            raise ValueError(f"split {split!r}, sample {i}: feature dims ({v.shape[1]}, {a.shape[1]}) differ from "
                             f"sample 0's ({visual.shape[2]}, {acoustic.shape[2]})")
        tokens = [t for w in words for t in tokenize(w)][: max_len - 2]
        k = len(tokens)
        ids[i, : k + 2] = [CLS_ID, *tokens, SEP_ID]
        mask[i, : k + 2] = 1
        rows_v, rows_a = v[: max_len - 2], a[: max_len - 2]  # MAG truncates rows to max_seq_length - 2 too
        visual[i, 1: 1 + len(rows_v)] = rows_v
        acoustic[i, 1: 1 + len(rows_a)] = rows_a
        label_arr = np.asarray(label, dtype=np.float64).reshape(-1)
        if label_arr.size != 1:
            raise ValueError(f"split {split!r}, sample {i}: expected one label value, found {label_arr.size}")
        labels[i] = label_arr[0]
        raw_text.append(" ".join(words))
        seg_ids.append(str(segment))
    text_bert = np.stack([ids, mask, np.zeros_like(ids)], axis=1)
    return {"raw_text": np.array(raw_text, dtype=object), "text_bert": text_bert, "audio": acoustic,
            "vision": visual, "id": np.array(seg_ids, dtype=object), "regression_labels": labels}


def to_mag(data: Mapping[str, Mapping[str, Any]], splits: Iterable[str] = ("train", "valid", "test")) -> dict:
    """MMSA dict (aligned layout: audio/vision rows = token positions) → MAG list-of-tuples (split ``valid`` → ``dev``).

    ``words = raw_text.split()``; features = the rows under the real tokens between [CLS] and [SEP] (rows
    1 .. n − 2); label as a (1, 1) array as MAG stores it; segment = ``id``. With word-piece tokenisation the number
    of words and of feature rows can differ (MAG's own files have that quirk too).
    """
    inverse = {v: k for k, v in _SPLIT_TO_MMSA.items()}
    out = {}
    for split in splits:
        if split not in data:
            raise ValueError(f"split {split!r}: missing (found {sorted(data)})")
        s = data[split]
        for key in ("text_bert", "audio", "vision", "regression_labels"):
            if key not in s:
                raise ValueError(f"split {split!r}: key {key!r} is missing")
        tb = np.asarray(s["text_bert"])
        if np.asarray(s["audio"]).shape[1] != tb.shape[2] or np.asarray(s["vision"]).shape[1] != tb.shape[2]:
            raise ValueError(f"split {split!r}: to_mag needs the aligned layout (audio/vision length = text length "
                             f"{tb.shape[2]}), found {np.asarray(s['audio']).shape[1]} / "
                             f"{np.asarray(s['vision']).shape[1]}; word-align first (msa_fast.data.word_align)")
        n_tok = tb[:, 1].sum(axis=1).astype(np.int64)
        ids = s.get("id", [str(i) for i in range(len(n_tok))])
        raw = s.get("raw_text")
        rows = []
        for i, n in enumerate(n_tok):
            words = str(raw[i]).split() if raw is not None else [f"w{int(k)}" for k in tb[i, 0, 1:n - 1]]
            rows.append(((words, np.asarray(s["vision"][i][1:n - 1], dtype=np.float32),
                          np.asarray(s["audio"][i][1:n - 1], dtype=np.float32)),
                         np.array([[float(s["regression_labels"][i])]], dtype=np.float32), str(ids[i])))
        out[inverse.get(split, split)] = rows
    return out
