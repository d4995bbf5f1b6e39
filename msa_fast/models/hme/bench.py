"""Benchmark factory for HME: a model and one batch of synthetic word-aligned (aligned_50) inputs."""
from __future__ import annotations

from typing import Optional

import torch

from ...data.batch import Batch
from ...data.dataset import MMSADataset
from ...data.missing import ModalityDrop
from ...data.synthetic import synthetic
from .model import HME
from ..registry import build
from ...nn.text_encoder import BERT_BASE_CONFIG, TINY_BERT_CONFIG


def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, missing_rate: Optional[float] = None,
          eval_retrieval: str = "in_batch") -> tuple[HME, Batch]:
    """(model, batch): the official configuration for ``dataset`` (MOSI / MOSEI) on word-aligned inputs.

    ``full_bert=False`` uses the 1-layer ``TINY_BERT_CONFIG``, ``True`` a BERT of bert-base's shape
    (``BERT_BASE_CONFIG``), both with random weights (nothing is downloaded). ``missing_rate`` (default: the official one
    of the dataset) drops whole modalities with ``ModalityDrop``. ``eval_retrieval="in_batch"`` (default here) lets an
    eval-mode forward run without a memory bank; ``"bank"`` builds the bank from this batch.
    """
    torch.manual_seed(seed)
    overrides = {"bert": dict(BERT_BASE_CONFIG if full_bert else TINY_BERT_CONFIG)}
    model = build("hme", dataset=dataset, eval_retrieval=eval_retrieval, **overrides)
    data = synthetic(dataset, n_train=batch_size, n_valid=0, n_test=0, seed=seed, aligned=True,
                     text_features=False)
    batch = MMSADataset(data["train"], use_text_features=False)[list(range(batch_size))]
    rate = model.config["missing_rate"] if missing_rate is None else missing_rate
    batch = ModalityDrop(mr=rate, seed=seed)(batch)
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    if eval_retrieval == "bank":
        model.build_memory_bank(batch)
    return model, batch
