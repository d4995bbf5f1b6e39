"""LNLN benchmark factory: a model and one token-erased, dataset-shaped batch (with its complete view).

``setup(batch_size=16, dataset="mosi", full_bert=False, seed=0, device=None, work="fast", **overrides)
-> (model, batch)``: the official architecture for ``dataset`` (full sequence lengths: MOSI attends over 58 / 383 /
508 tokens in the text / audio / vision compressors) with a randomly initialised BERT — the 1-layer
``TINY_BERT_CONFIG`` by default, a BERT-base-sized one (12 layers, 110 M parameters, random weights, no download)
with ``full_bert=True``. The batch is built as training builds it: a complete synthetic batch (precomputed text
features too when ``use_text_features=True`` is among the overrides) through LNLN's erasure schedule
(``TokenErasure``: about half the rows keep each modality complete), so the incomplete view is the erased one and
``batch.complete`` the original, and ``model.training_step(batch)`` runs the full objective.

``work="equal"``: the official step's work — its two full passes (``share_complete_pass="never"``: the complete view
goes through BERT / the text projection and the audio / vision projections again even where the erasure left a row
unchanged) and token transformers computing every row before keeping the first ones (``kept_rows_only=False``);
``"fast"``: the defaults, which skip both (same numbers). The model is returned in train mode;
``overrides`` go to the config.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ...data.batch import Batch
from ..bench_factory import check_work, model_and_batch


def setup(batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
          device: Optional[torch.device | str] = None, work: str = "fast",
          **overrides: Any) -> tuple[torch.nn.Module, Batch]:
    from ...data.missing import TokenErasure

    if check_work(work) == "equal":
        overrides.setdefault("share_complete_pass", "never")
        overrides.setdefault("kept_rows_only", False)
    model, complete = model_and_batch("lnln", batch_size, dataset, full_bert, seed, **overrides)
    batch = TokenErasure(seed=seed)(complete, epoch=0, split="train")
    if device is not None:
        model, batch = model.to(device), batch.to(device)
    return model, batch
