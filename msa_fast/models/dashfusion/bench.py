"""Benchmark factory for DashFusion: a model and one batch of synthetic dataset-shaped inputs."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from .model import DashFusion
from ..bench_factory import check_work, full_length_text, model_and_batch


def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, work: str = "fast", **overrides: Any
          ) -> tuple[DashFusion, Batch]:
    """(model, batch): the official configuration for ``dataset`` with full-length audio/vision and ragged lengths.

    ``full_bert=False`` uses the 1-layer ``TINY_BERT_CONFIG``, ``True`` a BERT of bert-base's shape
    (``BERT_BASE_CONFIG``), both with random weights (nothing is downloaded; the cost is the real one).
    ``work="equal"``: every text runs to the padded length L_t (MOSI 50), so the model — which crops text to the
    batch's longest — attends over what the official tokenizer gives a batch of long utterances (``"fast"``: the
    synthetic ragged texts, cropped to their longest). ``overrides`` go to the config.
    """
    overrides.setdefault("epochs", 1)
    model, batch = model_and_batch("dashfusion", batch_size, dataset, full_bert, seed, **overrides)
    if check_work(work) == "equal":
        batch = full_length_text(batch)
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    return model, batch
