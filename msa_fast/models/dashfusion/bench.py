"""Benchmark factory for DashFusion: a model and one batch of synthetic dataset-shaped inputs."""
from __future__ import annotations

from typing import Optional

import torch

from ...data.batch import Batch
from ...data.dataset import MMSADataset
from ...data.synthetic import synthetic
from .model import DashFusion
from ..registry import build
from ...nn.text_encoder import BERT_BASE_CONFIG, TINY_BERT_CONFIG


def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None) -> tuple[DashFusion, Batch]:
    """(model, batch): the official configuration for ``dataset`` with full-length audio/vision and ragged lengths.

    ``full_bert=False`` uses the 1-layer ``TINY_BERT_CONFIG``, ``True`` a BERT of bert-base's shape
    (``BERT_BASE_CONFIG``), both with random weights (nothing is downloaded; the cost is the real one).
    """
    torch.manual_seed(seed)
    overrides = {"bert": dict(BERT_BASE_CONFIG if full_bert else TINY_BERT_CONFIG)}
    model = build("dashfusion", dataset=dataset, epochs=1, **overrides)
    data = synthetic(dataset, n_train=batch_size, n_valid=0, n_test=0, seed=seed, text_features=False)
    batch = MMSADataset(data["train"], use_text_features=False)[list(range(batch_size))]
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    return model, batch
