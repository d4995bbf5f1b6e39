"""LNLN benchmark factory: a model and one token-erased, dataset-shaped batch (with its complete view).

``setup(batch_size=16, dataset="mosi", full_bert=False, **overrides) -> (model, batch)``: the official
architecture for ``dataset`` (full sequence lengths: MOSI attends over 58 / 383 / 508 tokens in the text / audio /
vision compressors) with a randomly initialised BERT — the 1-layer ``TINY_BERT_CONFIG`` by default, a BERT-base-sized
one (12 layers, 110 M parameters, random weights, no download) with ``full_bert=True``. The batch comes from
``msa_fast.data.synthetic`` and LNLN's training erasure schedule (``TokenErasure``: about half the rows keep each
modality complete), so ``model.training_step(batch)`` runs the full objective including the complete-view pass.
The model is returned in train mode; ``overrides`` go to the config (e.g. ``share_complete_pass="never"``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from ..bench_factory import model_and_batch



def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, **overrides: Any) -> tuple[torch.nn.Module, Batch]:
    from ...data.missing import TokenErasure

    model, complete = model_and_batch("lnln", batch_size, dataset, full_bert, seed, **overrides)
    batch = TokenErasure(seed=seed)(complete, epoch=0, split="train")
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    return model, batch
