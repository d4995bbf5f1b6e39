"""Benchmark factory for HME: a model and one batch of synthetic word-aligned (aligned_50) inputs."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from ...data.missing import ModalityDrop
from .model import HME
from ..bench_factory import check_work, model_and_batch


def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, missing_rate: Optional[float] = None,
          eval_retrieval: str = "in_batch", work: str = "fast", **overrides: Any) -> tuple[HME, Batch]:
    """(model, batch): the official configuration for ``dataset`` (MOSI / MOSEI) on word-aligned inputs.

    ``full_bert=False`` uses the 1-layer ``TINY_BERT_CONFIG``, ``True`` a BERT of bert-base's shape
    (``BERT_BASE_CONFIG``), both with random weights (nothing is downloaded). ``missing_rate`` (default: the official one
    of the dataset) drops whole modalities with ``ModalityDrop``. ``eval_retrieval="in_batch"`` (default here) lets an
    eval-mode forward run without a memory bank; ``"bank"`` builds the bank from this batch. ``overrides`` go to the
    config (e.g. ``use_text_features=True``). ``work``: ``"fast"`` and ``"equal"`` are the same step — HME's exact
    shortcuts (one-key attentions, the retrieval op) skip no official work, and the official optimizer (no decay on
    biases / LayerNorm weights) and value clipping at 0.8 are the trainer's, which the benchmark's step uses.
    """
    check_work(work)
    model, batch = model_and_batch("hme", batch_size, dataset, full_bert, seed, aligned=True,
                                   eval_retrieval=eval_retrieval, **overrides)
    rate = model.config["missing_rate"] if missing_rate is None else missing_rate
    batch = ModalityDrop(mr=rate, seed=seed)(batch)
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    if eval_retrieval == "bank":
        model.build_memory_bank(batch)
    return model, batch
