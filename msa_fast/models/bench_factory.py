"""What the methods' benchmark factories (``<method>/bench.py``) share: the model in train mode, one synthetic,
dataset-shaped training batch, and the two kinds of work a benchmark can time.

``work`` (every factory's keyword):

- ``"fast"``: the library's defaults — what a user of msa_fast runs, exact shortcuts included (e.g. LNLN's
  complete-view pass reusing the rows the erasure left unchanged, DashFusion cropping text to the batch's longest).
- ``"equal"``: exactly the work of the official training step, so a figure can be set beside the official code's
  (each factory's docstring says what changes; methods without official code have nothing to change).
"""
from __future__ import annotations

from typing import Any

import torch

from ..data.batch import Batch
from ..nn.text_encoder import BERT_BASE_CONFIG, TINY_BERT_CONFIG

WORK_MODES = ("fast", "equal")


def check_work(work: str) -> str:
    if work not in WORK_MODES:
        raise ValueError(f"work must be one of {WORK_MODES}, got {work!r}")
    return work


def model_and_batch(name: str, batch_size: int, dataset: str, full_bert: bool, seed: int, aligned: bool = False,
                    **overrides: Any) -> tuple[torch.nn.Module, Batch]:
    """``build(name, dataset, **overrides)`` in train mode — with the 1-layer ``TINY_BERT_CONFIG``, or a BERT of
    bert-base's shape (``BERT_BASE_CONFIG``, random weights) when ``full_bert`` and no ``bert`` override — and the
    first ``batch_size`` rows of a synthetic train split (precomputed text features when the model reads them)."""
    from ..data.dataset import MMSADataset
    from ..data.synthetic import synthetic
    from .registry import build

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    torch.manual_seed(seed)
    overrides.setdefault("bert", dict(BERT_BASE_CONFIG if full_bert else TINY_BERT_CONFIG))
    model = build(name, dataset=dataset, **overrides)
    model.train()
    features = bool(model.config.get("use_text_features", False))
    data = synthetic(dataset, n_train=batch_size, n_valid=0, n_test=0, seed=seed, aligned=aligned,
                     text_features=features)
    return model, MMSADataset(data["train"], use_text_features=features, split="train")[list(range(batch_size))]


def full_length_text(batch: Batch) -> Batch:
    """``batch`` with every text running to the padded length L_t (attention mask all ones, the padding positions
    given ordinary token ids): the longest text the MMSA ids can carry, so a model that crops text to the batch's
    longest one does the work of the official tokenizer's longest batch."""
    ids, mask = batch.text_ids, batch.text_attention_mask
    filler = 100 + torch.arange(ids.shape[1], device=ids.device).expand_as(ids) % 800  # in every BERT's vocabulary
    changes = {"text_ids": torch.where(mask.bool(), ids, filler.to(ids.dtype)),
               "text_attention_mask": torch.ones_like(mask)}
    if batch.complete is not None:
        changes["complete"] = full_length_text(batch.complete)
    return batch.replace(**changes)
