"""MMCL benchmark factory: a model and one dataset-shaped batch, with the replay ring already primed.

``setup(batch_size=16, dataset="mosi", full_bert=False, seed=0, device=None, prime=True, **overrides)
-> (model, batch)``: the official configuration (d 128, FFN 2048) with a randomly initialised BERT (the 1-layer
``TINY_BERT_CONFIG``, or a BERT-base-sized one with ``full_bert=True``; ``use_text_features=True`` in ``overrides``
reads random precomputed features instead). MOSI / MOSEI batches are word-aligned (``aligned_50`` layout, L = 50),
SIMS batches unaligned (word-aligned inside the model). ``prime``: three ``training_step`` calls without gradients
fill the replay ring past B transitions, so the next ``training_step`` runs the whole step — task loss, push,
critic and actor losses from B sampled transitions (``msa-fast bench models`` rebuilds the model for its
``features`` variant, whose first two timed calls then run without the RL part). The model is in train mode.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from ...nn.text_encoder import BERT_BASE_CONFIG, TINY_BERT_CONFIG



def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, prime: bool = True, **overrides: Any
          ) -> tuple[torch.nn.Module, Batch]:
    from ...data.dataset import MMSADataset
    from ...data.specs import get_dataset_spec
    from ...data.synthetic import synthetic
    from ..registry import build

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    torch.manual_seed(seed)
    overrides.setdefault("use_text_features", False)
    overrides.setdefault("bert", dict(BERT_BASE_CONFIG if full_bert else TINY_BERT_CONFIG))
    model = build("mmcl", dataset=dataset, **overrides)
    aligned = get_dataset_spec(dataset).aligned_available
    data = synthetic(dataset, n_train=batch_size, n_valid=0, n_test=0, seed=seed, aligned=aligned,
                     text_features=bool(overrides["use_text_features"]))
    batch = MMSADataset(data["train"], split="train")[list(range(batch_size))]
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    model.train()
    if prime:
        with torch.no_grad():
            for _ in range(3):
                model.training_step(batch)
    return model, batch
