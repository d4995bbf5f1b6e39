"""The ``Batch`` every model consumes: tensors of one mini-batch plus key-padding masks, on any device.

Conventions (shared by data, models and ops):
- ``*_padding_mask``: bool, ``True`` = padding (the ``nn.MultiheadAttention`` key-padding convention).
- ``availability``: bool (B, 3) in (text, audio, vision) order, ``True`` = modality present.
- Missing-data protocols never mutate a batch: they return a new one whose ``complete`` field holds the
  original (LNLN needs both views).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional

import torch
from torch import Tensor

MODALITIES = ("text", "audio", "vision")


@dataclass
class Batch:
    """One mini-batch in MMSA layout, already tensors.

    Shapes: B = batch, L_t / L_a / L_v = text / audio / vision lengths (padded), D_a / D_v feature dims.
    """

    text_ids: Tensor  # (B, L_t) int64, BERT input ids (text_bert[:, 0])
    text_attention_mask: Tensor  # (B, L_t) int64, 1 = real token (text_bert[:, 1])
    text_segment_ids: Tensor  # (B, L_t) int64 (text_bert[:, 2])
    audio: Tensor  # (B, L_a, D_a) float
    vision: Tensor  # (B, L_v, D_v) float
    audio_lengths: Tensor  # (B,) int64 valid frames
    vision_lengths: Tensor  # (B,) int64 valid frames
    labels: Tensor  # (B,) float, regression labels ('M')
    index: Tensor  # (B,) int64, row of the sample in its split
    ids: list[str] = field(default_factory=list)  # MMSA sample ids
    raw_text: list[str] = field(default_factory=list)
    text_features: Optional[Tensor] = None  # (B, L_t, 768) precomputed BERT features ('text' key) if loaded
    labels_unimodal: Optional[dict[str, Tensor]] = None  # SIMS: {'T','A','V'} -> (B,)
    availability: Optional[Tensor] = None  # (B, 3) bool (text, audio, vision); None = all present
    text_keep_mask: Optional[Tensor] = None  # (B, L_t) bool, erasure protocol: True = token kept
    audio_keep_mask: Optional[Tensor] = None  # (B, L_a) bool
    vision_keep_mask: Optional[Tensor] = None  # (B, L_v) bool
    missing_rates: Optional[Tensor] = None  # (B, 3) float drawn erasure rates (text, audio, vision)
    complete: Optional["Batch"] = None  # the same samples before a missing-data protocol was applied
    domain: Optional[Tensor] = None  # (B,) int64 domain id (DG protocol: sources 0..S-1, unseen target S); None = one

    # ---- derived views -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def text_lengths(self) -> Tensor:
        """(B,) int64 number of real tokens (incl. [CLS]/[SEP])."""
        return self.text_attention_mask.sum(dim=1).long()

    @property
    def text_padding_mask(self) -> Tensor:
        """(B, L_t) bool, True = padding token."""
        return self.text_attention_mask == 0

    @property
    def audio_padding_mask(self) -> Tensor:
        """(B, L_a) bool, True = frame at or beyond ``audio_lengths``."""
        return lengths_to_padding_mask(self.audio_lengths, self.audio.shape[1])

    @property
    def vision_padding_mask(self) -> Tensor:
        """(B, L_v) bool, True = frame at or beyond ``vision_lengths``."""
        return lengths_to_padding_mask(self.vision_lengths, self.vision.shape[1])

    @property
    def text_bert(self) -> Tensor:
        """(B, 3, L_t) float, the MMSA ``text_bert`` layout (ids, mask, segments)."""
        return torch.stack([self.text_ids, self.text_attention_mask, self.text_segment_ids], dim=1).float()

    def availability_or_ones(self) -> Tensor:
        if self.availability is not None:
            return self.availability
        return torch.ones(self.batch_size, 3, dtype=torch.bool, device=self.labels.device)

    # ---- movement ------------------------------------------------------------------------------
    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """A copy with every tensor on ``device`` (strings and lists are shared)."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, Batch):
                changes[f.name] = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, dict):
                changes[f.name] = {k: v.to(device, non_blocking=non_blocking) for k, v in value.items()}
        return replace(self, **changes)

    def replace(self, **changes) -> "Batch":
        return replace(self, **changes)


def lengths_to_padding_mask(lengths: Tensor, max_len: int) -> Tensor:
    """(B,) lengths → (B, max_len) bool, True at positions >= length."""
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]
