"""MIDG benchmark factory (reconstruction, not the authors' code): a model and one dataset-shaped synthetic batch.

``setup(batch_size=16, dataset="mosi", full_bert=False, seed=0, device=None, **overrides) -> (model, batch)``: the
default MIDG configuration for ``dataset`` (full sequence lengths) with a randomly initialised, frozen BERT — the
1-layer ``TINY_BERT_CONFIG`` by default, a BERT-base-sized one (12 layers, random weights, no download) with
``full_bert=True`` — and a CMA adapter after each of its layers. The model is returned in train mode; ``overrides``
go to the config (e.g. ``routing="topk"``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from ...nn.text_encoder import BERT_BASE_CONFIG, TINY_BERT_CONFIG


def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, **overrides: Any) -> tuple[torch.nn.Module, Batch]:
    from ...data.dataset import MMSADataset
    from ...data.synthetic import synthetic
    from ..registry import build

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    torch.manual_seed(seed)
    overrides.setdefault("bert", dict(BERT_BASE_CONFIG if full_bert else TINY_BERT_CONFIG))
    model = build("midg", dataset=dataset, **overrides)
    model.train()
    data = synthetic(dataset, n_train=batch_size, n_valid=0, n_test=0, seed=seed,
                     text_features=bool(overrides.get("use_text_features", False)))
    batch = MMSADataset(data["train"], split="train")[list(range(batch_size))]
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    return model, batch
