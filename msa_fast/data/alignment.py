"""Word alignment of frame-level features to BERT token positions (HME / MAG layout)."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["word_align"]

_CHUNK = 512  # samples per scatter (bounds the float64 temporaries for MOSEI-size inputs)


def word_align(features, lengths, text_lengths, out_len: int = 50):
    """HME-style word alignment: (N, L, D) frames → (N, out_len, D) one row per token position.

    For sample i with ``text_lengths[i]`` = n tokens ([CLS], n − 2 words, [SEP]) the valid frames
    ``[0, lengths[i])`` are split into n − 2 contiguous chunks of near-equal size exactly as
    ``numpy.array_split`` does (the first ``len % (n−2)`` chunks are one frame longer); word w's feature is the mean of
    chunk w and goes to row w + 1. Row 0 ([CLS]), row n − 1 ([SEP]) and rows ≥ n are zero. Means are accumulated in
    float64 and returned in the input dtype. An empty chunk (fewer valid frames than words) gives a zero row where
    ``numpy.mean`` would give NaN. At most ``out_len − 2`` words are placed (longer texts are truncated as MAG does).

    Args:
        features: (N, L, D) float, numpy array or tensor (any device).
        lengths: (N,) int valid frames, in [0, L].
        text_lengths: (N,) int number of real tokens incl. [CLS]/[SEP] (``attention_mask.sum(1)``).
        out_len: rows of the output (the text length L_t).
    Returns:
        (N, out_len, D) of the input's type (numpy in → numpy out), dtype and device.
    """
    is_numpy = isinstance(features, np.ndarray)
    x = torch.from_numpy(features) if is_numpy else features
    if not isinstance(x, Tensor) or x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"features must be a float (N, L, D) array, got {getattr(x, 'shape', type(x))}")
    n, max_len, dim = x.shape
    lens = torch.as_tensor(np.asarray(lengths) if not isinstance(lengths, Tensor) else lengths).to(x.device).long()
    tlens = torch.as_tensor(
        np.asarray(text_lengths) if not isinstance(text_lengths, Tensor) else text_lengths).to(x.device).long()
    if lens.shape != (n,) or tlens.shape != (n,):
        raise ValueError(f"lengths and text_lengths must have shape ({n},), got {tuple(lens.shape)}, "
                         f"{tuple(tlens.shape)}")
    if n and (lens.min() < 0 or lens.max() > max_len):
        raise ValueError(f"lengths must lie in [0, {max_len}]")
    if out_len < 2:
        raise ValueError(f"out_len must be >= 2, got {out_len}")

    n_words = (tlens - 2).clamp(min=0)  # (N,)
    out = torch.zeros(n, out_len, dim, dtype=x.dtype, device=x.device)
    pos = torch.arange(max_len, device=x.device)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        nw, ln = n_words[sl], lens[sl]
        q = torch.div(ln, nw.clamp(min=1), rounding_mode="floor")[:, None]  # base chunk size
        r = torch.remainder(ln, nw.clamp(min=1))[:, None]  # number of chunks one frame longer
        t = pos[None, :]
        long_part = r * (q + 1)
        word = torch.where(t < long_part, torch.div(t, q + 1, rounding_mode="floor"),
                           r + torch.div(t - long_part, q.clamp(min=1), rounding_mode="floor"))
        valid = (t < ln[:, None]) & (nw[:, None] > 0) & (word < out_len - 2)
        row = torch.where(valid, word + 1, torch.full_like(word, out_len))  # row out_len = discard bin
        b = row.shape[0]
        sums = torch.zeros(b, out_len + 1, dim, dtype=torch.float64, device=x.device)
        sums.scatter_add_(1, row[:, :, None].expand(b, max_len, dim), x[sl].to(torch.float64))
        counts = torch.zeros(b, out_len + 1, dtype=torch.float64, device=x.device)
        counts.scatter_add_(1, row, valid.to(torch.float64))
        means = sums[:, :out_len] / counts[:, :out_len, None].clamp(min=1.0)
        out[sl] = means.to(x.dtype)
    return out.numpy() if is_numpy else out
