"""What the methods' benchmark factories (``<method>/bench.py``) share: the model in train mode and one synthetic,
dataset-shaped training batch."""
from __future__ import annotations

from typing import Any

import torch

from ..data.batch import Batch
from ..nn.text_encoder import BERT_BASE_CONFIG, TINY_BERT_CONFIG


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
    data = synthetic(dataset, n_train=batch_size, n_valid=0, n_test=0, seed=seed, aligned=aligned,
                     text_features=bool(model.config.get("use_text_features", False)))
    return model, MMSADataset(data["train"], split="train")[list(range(batch_size))]
