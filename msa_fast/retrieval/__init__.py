"""Cross-sample retrieval: kNN ``Index`` (FAISS or torch), HME's ``MemoryBank`` and in-batch op, DashFusion partners.

Imports are cheap: FAISS is imported lazily by ``Index``, Triton only by the in-batch op's triton backend.
"""
from __future__ import annotations

from .in_batch import in_batch_retrieve, official_loop_retrieve
from .index import Index, faiss_or_none
from .memory_bank import MemoryBank
from .partners import label_aware_partners, official_partner_loop

__all__ = ["Index", "MemoryBank", "faiss_or_none", "in_batch_retrieve", "label_aware_partners",
           "official_loop_retrieve", "official_partner_loop"]
