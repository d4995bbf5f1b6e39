"""HME's evaluation-time memory bank (``eval_retrieval="bank"``, the default) on ``msa_fast.retrieval.MemoryBank``.

The in-batch retrieval (official, used in training and with ``eval_retrieval="in_batch"``) is the retrieval helper's
sync-free op ``msa_fast.retrieval.in_batch.in_batch_retrieve``. The bank applies the same rule with the training set
as the indexed set: for a query h_i (D,), neighbours = {available bank rows j : cos(h_i, b_j) ≥ α} (``k=None``: all of
them, exact, none cut off by a top-k); R_i = unweighted mean of the neighbours; fallback when there is no neighbour
**or** Σ_k h_ik == 0 (official entry-sum test): R_i = mean of the available bank rows whose entry sum ≠ 0. No self
exclusion (evaluation samples are not in the bank). A modality missing for a training sample (``Batch.availability``
of the train data) is never retrieved; a modality missing in every training sample gives R = 0 (the fallback over no
rows). Bank entries are detached: no gradient flows into the neighbours.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from ...data.batch import Batch
from ...data.dataset import SplitRows
from ...distributed import encode_batches_sharded
from ...retrieval.memory_bank import MemoryBank


@torch.no_grad()
def build_hme_bank(encode: Callable[[Batch], Mapping[str, Tensor]], train_data: Any, modalities: Sequence[str],
                   dim: int, batch_size: int, device: Union[str, torch.device]) -> MemoryBank:
    """Encode the train split with ``encode`` (→ ``H_<m>`` (B, dim)) into a ``MemoryBank`` keyed by ``Batch.index``.

    ``train_data``: anything ``msa_fast.data.dataset.SplitRows`` accepts. Availability (B, M) of the train
    batches (None = all present) marks missing modalities as unavailable. Under ``torch.distributed`` the batches
    are dealt to the ranks and the embeddings gathered (``encode_batches_sharded``): every rank builds the same bank
    from all ranks' features, each encoding 1/world of the split; every rank must call it.
    """
    split = SplitRows(train_data)
    if len(split) == 0:
        raise ValueError("train_data holds no samples: cannot build the HME memory bank")

    def encode_rows(rows: range) -> dict[str, Tensor]:
        b = split.rows(torch.arange(rows.start, rows.stop)).to(device)
        enc = encode(b)
        return {"index": b.index.to(device), "available": b.availability_or_ones().to(device, torch.uint8),
                **{f"H_{m}": enc[f"H_{m}"] for m in modalities}}

    out = encode_batches_sharded(len(split), batch_size, encode_rows)
    ids, available = out["index"], out["available"].bool()
    bank = MemoryBank(int(ids.max()) + 1, dim, modalities, metric="cosine", kind="flat", device=device,
                      index_kwargs={"backend": "torch"})  # exact torch GEMM: deterministic neighbour sets
    for i, m in enumerate(modalities):
        bank.update(m, ids, out[f"H_{m}"], available[:, i])
    return bank


def bank_retrieve(bank: MemoryBank, modality: str, queries: Tensor, threshold: float,
                  details: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """queries (B, D) → R (B, D) and, with ``details``, ``{"cos": (B, N), "neighbours": (B, N) bool}`` over the
    bank rows (rows that are not candidates, i.e. unavailable, have cos −inf)."""
    b, n = queries.shape[0], bank.num_samples
    if not bool(bank.available[modality].any()):  # modality missing in every training sample: nothing to retrieve
        r = queries.new_zeros(queries.shape)
        info = {"ids": torch.empty(b, 0, dtype=torch.long), "scores": torch.empty(b, 0),
                "valid": torch.zeros(b, 0, dtype=torch.bool)}
    else:
        r, info = bank.retrieve(modality, queries, k=None, threshold=threshold,
                                fallback_mask=queries.detach().sum(dim=1) == 0)
    if not details:
        return r, {}
    ids, scores, valid = info["ids"].clamp_min(0), info["scores"], info["valid"]
    cos = scores.new_full((b, n), float("-inf")).scatter_(1, ids, scores)
    neighbours = torch.zeros(b, n, dtype=torch.bool, device=valid.device).scatter_(1, ids, valid)
    return r, {"cos": cos.to(queries.device), "neighbours": neighbours.to(queries.device)}
