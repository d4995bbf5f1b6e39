"""Missing-modality protocols (spec data_and_metrics.md §5), drawn on the batch's device.

Three incompatible protocols — never mix their numbers in one table:

- ``TokenErasure`` (LNLN, §5.1): per-sample, per-modality erasure rates; dropped text tokens → [UNK] (100),
  dropped audio/vision frames → 0.
- ``ModalityDrop`` (HME / GCNet, §5.2): dataset-level missing rate MR over (sample, modality) slots, at least one
  modality kept per sample; sets ``Batch.availability``.
- ``PatternAvailability`` (CyIN, §5.3): a fixed availability pattern, or instance-level ``miss_prob`` with one of
  the six incomplete patterns chosen uniformly.

**Determinism.** Every random number is a counter-based hash of (seed, split, epoch, sample index, modality,
position) computed with integer tensor ops on the batch's device — no global RNG state, no ``torch.Generator``.
A sample's mask therefore does not depend on the batch it is in, the batch order, the batch size or the device;
a new ``epoch`` gives a new draw and ``epoch=0`` every time gives fixed evaluation masks. Masks for different rates
are nested (the same uniform field is compared with each rate), as in LNLN.

Each protocol is a callable ``protocol(batch, epoch=0, split="train") -> Batch`` returning a **new** batch whose
``complete`` field is the original (``Batch`` never mutates). ``parse_missing("lnln:0.5")`` builds one from a CLI
string. The ``official_*`` functions reproduce the official NumPy algorithms (global/seeded NumPy RNG) for parity.
"""
from __future__ import annotations

import abc

import random
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .batch import Batch

__all__ = [
    "MissingProtocol",
    "TokenErasure",
    "ModalityDrop",
    "PatternAvailability",
    "parse_missing",
    "hash_uniform",
    "PATTERNS",
    "INCOMPLETE_PATTERNS",
    "official_lnln_generate_m",
    "official_lnln_masks",
    "official_lnln_train_rates",
    "generate_missing_matrix",
]

UNK_ID = 100
MODALITY_CODES = {"text": 1, "audio": 2, "vision": 3}
# availability patterns in (text, audio, vision) order (CyIN's "fix" settings)
PATTERNS = {
    "TAV": (1, 1, 1), "T": (1, 0, 0), "A": (0, 1, 0), "V": (0, 0, 1),
    "TA": (1, 1, 0), "TV": (1, 0, 1), "AV": (0, 1, 1),
}
# CyIN's miss_prob patterns, in its order ([1,0,1], [1,1,0], [0,1,1], [1,0,0], [0,0,1], [0,1,0])
INCOMPLETE_PATTERNS = ((1, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 0), (0, 0, 1), (0, 1, 0))

# ---- counter-based RNG --------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF
# odd multipliers < 2^31: a value < 2^32 times one stays < 2^63, so int64 never overflows on any device
_C1, _C2, _C3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39
_STREAMS = {"rate_coin": 11, "rate": 12, "keep": 13, "anchor": 21, "drop": 22, "pattern_coin": 31, "pattern": 32}


def _mix32(x: Tensor) -> Tensor:
    """Bijective avalanche mix of int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    x = x ^ (x >> 15)
    x = (x * _C3) & _M32
    return x ^ (x >> 16)


def _combine(h: Tensor, value) -> Tensor:
    v = value if isinstance(value, Tensor) else torch.tensor(int(value) & _M32, device=h.device)
    return _mix32(h ^ _mix32((v + 0x61C88647) & _M32))


def _salt(text: str) -> int:
    return zlib.crc32(text.encode())


def hash_uniform(seed: int, split: str, epoch: int, index: Tensor, *keys, positions: Optional[int] = None) -> Tensor:
    """Uniforms in [0, 1) (float32, 24-bit) that are a pure function of their arguments.

    Args:
        index: (B,) int64 sample indices (device of the result).
        keys: further integers mixed in (modality code, stream).
        positions: if given, the result is (B, positions) with the position mixed in; else (B,).
    """
    h = torch.full_like(index, int(seed) & _M32)
    for k in (_salt(split), int(epoch), *keys):
        h = _combine(h, k)
    h = _combine(h, index & _M32)
    if positions is not None:
        h = _combine(h[:, None], torch.arange(positions, device=index.device)[None, :])
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


# ---- protocol base ----------------------------------------------------------------------------------------
class MissingProtocol(abc.ABC):
    """Base class: ``__call__(batch, epoch=0, split="train") -> Batch`` (new batch, ``complete`` = original)."""

    name = "none"

    @abc.abstractmethod
    def __call__(self, batch: Batch, epoch: int = 0, split: str = "train") -> Batch:
        """The batch with this protocol's masks applied."""

    def describe(self) -> str:
        """Protocol name and parameters, to be carried by every reported number."""
        return self.name


def _complete_of(batch: Batch) -> Batch:
    return batch.complete if batch.complete is not None else batch


def _check_rate(name: str, value: float, high: float = 1.0) -> float:
    if not isinstance(value, (int, float, np.floating)) or not 0.0 <= float(value) <= high:
        raise ValueError(f"{name} must be a number in [0, {high:g}], got {value!r}")
    return float(value)


# ---- (a) LNLN token / frame erasure -------------------------------------------------------------------
@dataclass
class TokenErasure(MissingProtocol):
    """LNLN erasure: valid position j of modality m in sample i is kept iff U_ij > r_im.

    ``rate=None`` is LNLN's **training** schedule: per sample and modality a hashed coin sets r = 0 with
    probability ``zero_fraction`` (0.5), otherwise r ~ U(0, 1). Deviation from LNLN: LNLN zeroes the rate of exactly
    ⌊N/2⌋ samples per modality chosen by ``random.sample`` over the whole split; a per-sample coin keeps the draw
    independent of the batch (the zeroed fraction is 0.5 in expectation, not exactly).
    ``rate=r`` is the **evaluation** schedule: r for every sample and modality (LNLN: 0.5 during training,
    0..0.9 in the robustness sweep). ``rates=(r_t, r_a, r_v)`` gives per-modality fixed rates (TFR-Net style).

    Text: valid = attention mask; [CLS] (position 0) and [SEP] (last valid position) are always kept; dropped ids
    become ``unk_id`` (100); the attention mask is unchanged (LNLN attends [UNK]). Audio/vision: valid = frame <
    length; dropped frames are zeroed. Precomputed ``text_features`` rows of erased tokens are zeroed. Keep masks are False on padding. ``Batch.missing_rates`` (B, 3) holds the
    drawn rates (LNLN's completeness label is 1 − rate_text).
    """

    rate: Optional[float] = None
    seed: int = 1111
    rates: Optional[Sequence[float]] = None
    zero_fraction: float = 0.5
    unk_id: int = UNK_ID
    modalities: Sequence[str] = ("text", "audio", "vision")

    def __post_init__(self):
        if self.rate is not None and self.rates is not None:
            raise ValueError("give either rate or rates, not both")
        if self.rate is not None:
            _check_rate("rate", self.rate)
        if self.rates is not None:
            if len(self.rates) != 3:
                raise ValueError(f"rates must hold 3 values (text, audio, vision), got {self.rates!r}")
            self.rates = tuple(_check_rate("rates[i]", r) for r in self.rates)
        _check_rate("zero_fraction", self.zero_fraction)
        unknown = set(self.modalities) - set(MODALITY_CODES)
        if unknown:
            raise ValueError(f"modalities must be among {tuple(MODALITY_CODES)}, got {sorted(unknown)}")
        self.name = "lnln"

    def describe(self) -> str:
        what = self.rates if self.rates is not None else ("train" if self.rate is None else self.rate)
        return f"lnln:{what} (seed={self.seed})"

    def draw_rates(self, index: Tensor, epoch: int = 0, split: str = "train") -> Tensor:
        """(B, 3) float32 rates in (text, audio, vision) order (0 for modalities not erased)."""
        out = torch.zeros(index.shape[0], 3, dtype=torch.float32, device=index.device)
        for k, m in enumerate(MODALITY_CODES):
            if m not in self.modalities:
                continue
            code = MODALITY_CODES[m]
            if self.rates is not None:
                out[:, k] = self.rates[k]
            elif self.rate is not None:
                out[:, k] = self.rate
            else:
                coin = hash_uniform(self.seed, split, epoch, index, code, _STREAMS["rate_coin"])
                r = hash_uniform(self.seed, split, epoch, index, code, _STREAMS["rate"])
                out[:, k] = torch.where(coin < self.zero_fraction, torch.zeros_like(r), r)
        return out

    def __call__(self, batch: Batch, epoch: int = 0, split: str = "train") -> Batch:
        index = batch.index
        rates = self.draw_rates(index, epoch, split)

        def keep(code: int, valid: Tensor, rate: Tensor) -> Tensor:
            u = hash_uniform(self.seed, split, epoch, index, code, _STREAMS["keep"], positions=valid.shape[1])
            return (u > rate[:, None]) & valid

        text_valid = batch.text_attention_mask != 0
        text_keep = keep(1, text_valid, rates[:, 0])
        lengths = text_valid.sum(dim=1)
        text_keep[:, 0] |= lengths > 0  # [CLS]
        sep = (lengths - 1).clamp(min=0)
        text_keep.scatter_(1, sep[:, None], text_keep.gather(1, sep[:, None]) | (lengths > 0)[:, None])  # [SEP]
        text_ids = torch.where(text_valid & ~text_keep, torch.full_like(batch.text_ids, self.unk_id), batch.text_ids)

        audio_keep = keep(2, ~batch.audio_padding_mask, rates[:, 1])
        vision_keep = keep(3, ~batch.vision_padding_mask, rates[:, 2])
        changes = {}
        if batch.text_features is not None:
            # Precomputed BERT features have no [UNK] vector: erased (non-[CLS]/[SEP]) positions are zeroed so a
            # model reading features sees the erasure too.
            erased = (text_valid & ~text_keep)[:, :, None]
            changes["text_features"] = batch.text_features.masked_fill(erased, 0.0)
        return batch.replace(
            **changes,
            text_ids=text_ids,
            audio=batch.audio * audio_keep[:, :, None].to(batch.audio.dtype),
            vision=batch.vision * vision_keep[:, :, None].to(batch.vision.dtype),
            text_keep_mask=text_keep, audio_keep_mask=audio_keep, vision_keep_mask=vision_keep,
            missing_rates=rates, complete=_complete_of(batch),
        )


# ---- availability helpers (b), (c) ------------------------------------------------------------------
def _apply_availability(batch: Batch, avail: Tensor, zero_features: bool) -> Batch:
    """Combine with existing availability; zero missing audio/vision (text: flag only — models zero it after BERT,
    as HME does)."""
    if batch.availability is not None:
        avail = avail & batch.availability.to(avail.device)
    changes = {"availability": avail, "complete": _complete_of(batch)}
    if zero_features:
        changes["audio"] = batch.audio * avail[:, 1, None, None].to(batch.audio.dtype)
        changes["vision"] = batch.vision * avail[:, 2, None, None].to(batch.vision.dtype)
        if batch.text_features is not None:
            changes["text_features"] = batch.text_features * avail[:, 0, None, None].to(batch.text_features.dtype)
    return batch.replace(**changes)


@dataclass
class ModalityDrop(MissingProtocol):
    """HME / GCNet whole-modality drop with dataset-level missing rate ``mr`` and at least one modality kept.

    Per sample (hashed, batch-independent): an anchor modality is chosen uniformly and always kept; each of the two
    others is dropped independently with probability q = 1.5·mr. The expected fraction of missing (sample, modality)
    slots is 2q/3 = mr exactly for mr in [0, 2/3]; this is the pattern distribution GCNet's
    ``generate_missing_matrix`` produces in expectation (one-hot keep + independent extra keeps). For mr ≥ 2/3 every
    sample keeps exactly one modality (realised rate 2/3), as GCNet's ``one_rate <= 1/3`` branch does.
    Deviation: GCNet also rejects draws whose realised rate is off by ≥ 0.005 over the split; here the rate is exact
    only in expectation (the hash is per sample).

    Sets ``Batch.availability`` (B, 3) bool and, with ``zero_features``, zeroes missing audio/vision (and
    ``text_features``); the text ids are left as they are. Pass a new ``epoch`` for HME's per-epoch redraw and a fixed
    epoch (0) for reproducible evaluation masks.
    """

    mr: float = 0.0
    seed: int = 1111
    zero_features: bool = True

    def __post_init__(self):
        _check_rate("mr (missing rate)", self.mr)
        if self.mr >= 1.0:
            raise ValueError("mr (missing rate) must be < 1: at least one modality is always kept")
        self.name = "modality"

    def describe(self) -> str:
        return f"modality:{self.mr} (seed={self.seed})"

    def availability(self, index: Tensor, epoch: int = 0, split: str = "train") -> Tensor:
        """(B, 3) bool availability (text, audio, vision)."""
        anchor = (hash_uniform(self.seed, split, epoch, index, _STREAMS["anchor"]) * 3).long().clamp(max=2)
        drop = hash_uniform(self.seed, split, epoch, index, _STREAMS["drop"], positions=3) < min(1.5 * self.mr, 1.0)
        keep_anchor = torch.nn.functional.one_hot(anchor, 3).bool()
        return keep_anchor | ~drop

    def __call__(self, batch: Batch, epoch: int = 0, split: str = "train") -> Batch:
        return _apply_availability(batch, self.availability(batch.index, epoch, split), self.zero_features)


@dataclass
class PatternAvailability(MissingProtocol):
    """CyIN availability: a fixed ``pattern`` ("TAV", "T", "A", "V", "TA", "TV", "AV") for every sample, or
    instance-level ``miss_prob`` p: each sample (hashed coin) is incomplete with probability p and then gets one of
    the six incomplete patterns uniformly (CyIN's list). Exactly one of the two must be given; unlike CyIN a
    ``miss_prob`` of 0.0 is accepted (all complete). CyIN's dataset-level ``miss_rate`` mode is ``ModalityDrop``.
    """

    pattern: Optional[str] = None
    miss_prob: Optional[float] = None
    seed: int = 1111
    zero_features: bool = True

    def __post_init__(self):
        if (self.pattern is None) == (self.miss_prob is None):
            raise ValueError("give exactly one of pattern (e.g. 'TA') or miss_prob (e.g. 0.5)")
        if self.pattern is not None:
            key = str(self.pattern).upper()
            if key not in PATTERNS:
                raise ValueError(f"pattern must be one of {list(PATTERNS)}, got {self.pattern!r}")
            self.pattern = key
        else:
            _check_rate("miss_prob", self.miss_prob)
        self.name = "pattern"

    def describe(self) -> str:
        if self.pattern is not None:
            return f"pattern:{self.pattern}"
        return f"pattern_prob:{self.miss_prob} (seed={self.seed})"

    def availability(self, index: Tensor, epoch: int = 0, split: str = "train") -> Tensor:
        if self.pattern is not None:
            row = torch.tensor(PATTERNS[self.pattern], dtype=torch.bool, device=index.device)
            return row.expand(index.shape[0], 3).clone()
        table = torch.tensor(INCOMPLETE_PATTERNS, dtype=torch.bool, device=index.device)
        coin = hash_uniform(self.seed, split, epoch, index, _STREAMS["pattern_coin"]) < self.miss_prob
        which = (hash_uniform(self.seed, split, epoch, index, _STREAMS["pattern"]) * 6).long().clamp(max=5)
        return torch.where(coin[:, None], table[which], torch.ones_like(table[which]))

    def __call__(self, batch: Batch, epoch: int = 0, split: str = "train") -> Batch:
        return _apply_availability(batch, self.availability(batch.index, epoch, split), self.zero_features)


def parse_missing(spec: Optional[str], seed: int = 1111) -> Optional[MissingProtocol]:
    """Protocol from a CLI string: ``none``, ``lnln:train``, ``lnln:0.5``, ``modality:0.3``, ``pattern:TA``,
    ``pattern_prob:0.5``. Returns None for ``none`` / empty."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return None
    text = str(spec).strip()
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    usage = "expected one of none, lnln:train, lnln:<rate>, modality:<MR>, pattern:<TAV|T|A|V|TA|TV|AV>, " \
            "pattern_prob:<p>"
    if not sep or not value.strip():
        raise ValueError(f"missing-data protocol {text!r}: {usage}")
    value = value.strip()
    try:
        return _build_protocol(kind, value, seed)
    except ValueError as err:
        raise ValueError(f"missing-data protocol {text!r}: {err}; {usage}") from None


def _build_protocol(kind: str, value: str, seed: int) -> MissingProtocol:
    if kind == "pattern":
        return PatternAvailability(pattern=value, seed=seed)
    if kind == "lnln" and value.lower() == "train":
        return TokenErasure(rate=None, seed=seed)
    if kind not in ("lnln", "modality", "pattern_prob"):
        raise ValueError(f"unknown kind {kind!r}")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if kind == "lnln":
        return TokenErasure(rate=number, seed=seed)
    if kind == "modality":
        return ModalityDrop(mr=number, seed=seed)
    return PatternAvailability(miss_prob=number, seed=seed)


# ---- official algorithms (NumPy, for parity) ----------------------------------------------------------
def official_lnln_generate_m(modality: np.ndarray, input_mask: Optional[np.ndarray], input_len: Optional[np.ndarray],
                             missing_rate: np.ndarray, missing_seed: int, mode: str = "text"):
    """LNLN's ``MMDataset.generate_m`` (re-implemented): returns ``(modality_m, input_len, input_mask, keep_mask)``.

    ``np.random.seed(missing_seed)`` then U (N, L) uniforms; keep iff U > rate and valid. Text: ``input_len =
    argmin(input_mask)`` (0 for a full row, so the [SEP] index −1 is the last position), positions 0 and
    ``input_len − 1`` forced to 1, dropped ids → 100. Audio/vision: valid = index < ``input_len``, frames multiplied by
    the keep mask. ``missing_rate`` is (N, 1). Reseeds NumPy's global RNG, as the original does.
    """
    rate = np.asarray(missing_rate).reshape(-1, 1)
    if mode == "text":
        input_mask = np.asarray(input_mask)
        input_len = np.argmin(input_mask, axis=1)
    elif mode in ("audio", "vision"):
        input_len = np.asarray(input_len).astype(np.int64)
        input_mask = (np.arange(modality.shape[1])[None, :] < input_len[:, None]).astype(np.int64)
    else:
        raise ValueError(f"mode must be 'text', 'audio' or 'vision', got {mode!r}")
    np.random.seed(missing_seed)
    keep = (np.random.uniform(size=input_mask.shape) > np.repeat(rate, input_mask.shape[1], axis=1)) * input_mask
    if mode == "text":
        rows = np.arange(keep.shape[0])
        keep[rows, 0] = 1
        keep[rows, input_len - 1] = 1
        modality_m = keep * modality + UNK_ID * (input_mask - keep)
    else:
        modality_m = keep[:, :, None] * modality
    return modality_m, input_len, input_mask, keep


def official_lnln_masks(text_bert: np.ndarray, audio: np.ndarray, vision: np.ndarray, audio_lengths: np.ndarray,
                        vision_lengths: np.ndarray, rates: np.ndarray, seed: int = 1111) -> dict:
    """LNLN's erasure of a whole split/batch as ``core/dataset.py`` applies it (text, audio, vision in turn, each
    reseeding with ``seed``). ``rates`` (N, 3) in (text, audio, vision) order. Returns keep masks (bool) and the
    erased ``text_bert``, ``audio``, ``vision``."""
    rates = np.asarray(rates)
    text_m, _, _, tk = official_lnln_generate_m(text_bert[:, 0], text_bert[:, 1], None, rates[:, 0:1], seed, "text")
    audio_m, _, _, ak = official_lnln_generate_m(audio, None, audio_lengths, rates[:, 1:2], seed, "audio")
    vision_m, _, _, vk = official_lnln_generate_m(vision, None, vision_lengths, rates[:, 2:3], seed, "vision")
    text_bert_m = np.concatenate([text_m[:, None], text_bert[:, 1:2], text_bert[:, 2:3]], axis=1)
    return {"text_keep_mask": tk.astype(bool), "audio_keep_mask": ak.astype(bool),
            "vision_keep_mask": vk.astype(bool), "text_bert": text_bert_m, "audio": audio_m, "vision": vision_m}


def official_lnln_train_rates(n: int) -> np.ndarray:
    """LNLN's training rates (N, 3): three ``np.random.uniform(size=(N, 1))`` draws, then per modality
    ``random.sample`` of ⌊N/2⌋ rows set to 0 (global NumPy and Python RNGs, as the original)."""
    rates = [np.random.uniform(size=(n, 1)) for _ in range(3)]
    for r in rates:
        r[random.sample(range(n), int(n / 2))] = 0
    return np.concatenate(rates, axis=1)


def generate_missing_matrix(M: int, view_num: int = 3, missing_rate: float = 0.5, rng=None) -> np.ndarray:
    """GCNet / HME ``generate_missing_matrix`` (re-implemented draw for draw): (M, view_num) keep matrix.

    ``rng`` = anything with NumPy's legacy ``randint`` (``np.random.RandomState``); None = the global NumPy RNG, so
    ``np.random.seed(s); generate_missing_matrix(...)`` reproduces the official call. one_rate = 1 − missing_rate;
    ≤ 1/view_num → one random modality per row (float one-hot); = 1 → all ones; otherwise rejection sampling over
    max(M, 32) rows until the kept fraction is within 0.005 of one_rate (int32).
    """
    rng = np.random if rng is None else rng
    one_rate = 1 - missing_rate
    eye = np.eye(view_num)
    if one_rate <= 1 / view_num:
        return eye[rng.randint(0, view_num, size=(M, 1))[:, 0]]
    if one_rate == 1:
        return rng.randint(1, 2, size=(M, view_num))
    n = max(M, 32)
    error = 1.0
    while error >= 0.005:
        preserve = eye[rng.randint(0, view_num, size=(n, 1))[:, 0]]
        one_num = view_num * n * one_rate - n
        ratio = one_num / (view_num * n)
        extra = (rng.randint(0, 100, size=(n, view_num)) < int(ratio * 100)).astype(np.int32)
        overlap = np.sum(((extra + preserve) > 1).astype(np.int32))
        one_num_corrected = one_num / (1 - overlap / one_num)
        ratio = one_num_corrected / (view_num * n)
        extra = (rng.randint(0, 100, size=(n, view_num)) < int(ratio * 100)).astype(np.int32)
        matrix = ((extra + preserve) > 0).astype(np.int32)
        error = abs(one_rate - np.sum(matrix) / (view_num * n))
    return matrix[:M, :]
