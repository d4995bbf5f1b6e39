"""MMCL benchmark factory: a model and one dataset-shaped batch, with the replay ring already primed.

``setup(batch_size=16, dataset="mosi", full_bert=False, seed=0, device=None, prime=True, work="fast", **overrides)
-> (model, batch)``: the official configuration (d 128, FFN 2048) with a randomly initialised BERT (the 1-layer
``TINY_BERT_CONFIG``, or a BERT-base-sized one with ``full_bert=True``; ``use_text_features=True`` in ``overrides``
reads random precomputed features instead). MOSI / MOSEI batches are word-aligned (``aligned_50`` layout, L = 50),
SIMS batches unaligned (word-aligned inside the model). ``prime``: three ``training_step`` calls without gradients
fill the replay ring past B transitions, so the next ``training_step`` runs the whole step — task loss, push,
critic and actor losses from B sampled transitions. The model is in train mode. ``work``: ``"fast"`` = ``"equal"``
(the official step's work; the model is a reconstruction).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from ..bench_factory import check_work, model_and_batch



def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, prime: bool = True, work: str = "fast",
          **overrides: Any
          ) -> tuple[torch.nn.Module, Batch]:
    from ...data.specs import get_dataset_spec

    check_work(work)  # a reconstruction: "equal" and "fast" are the same step
    overrides.setdefault("use_text_features", False)
    model, batch = model_and_batch("mmcl", batch_size, dataset, full_bert, seed,
                                   aligned=get_dataset_spec(dataset).aligned_available, **overrides)
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    if prime:
        with torch.no_grad():
            for _ in range(3):
                model.training_step(batch)
    return model, batch
