"""MIDG benchmark factory (reconstruction, not the authors' code): a model and one dataset-shaped synthetic batch.

``setup(batch_size=16, dataset="mosi", full_bert=False, seed=0, device=None, work="fast", **overrides) -> (model, batch)``: the
default MIDG configuration for ``dataset`` (full sequence lengths) with a randomly initialised, frozen BERT — the
1-layer ``TINY_BERT_CONFIG`` by default, a BERT-base-sized one (12 layers, random weights, no download) with
``full_bert=True`` — and a CMA adapter after each of its layers. The model is returned in train mode; ``overrides``
go to the config (e.g. ``routing="topk"``). ``work``: ``"fast"`` = ``"equal"`` (no official code to match).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from ..bench_factory import check_work, model_and_batch


def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, work: str = "fast", **overrides: Any) -> tuple[torch.nn.Module, Batch]:
    check_work(work)  # no official code: "equal" and "fast" are the same step
    model, batch = model_and_batch("midg", batch_size, dataset, full_bert, seed, **overrides)
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    return model, batch
