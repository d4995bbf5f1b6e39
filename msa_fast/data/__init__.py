"""Data layer: MMSA reader + validation, synthetic generator, Dataset/collate → Batch, missing-data protocols.

    from msa_fast.data import load_mmsa, synthetic, make_loader, TokenErasure
    data = synthetic("mosi", 512, 128, 256, seed=0)          # or load_mmsa("MOSI/Processed/unaligned_50.pkl")
    for batch in make_loader(data["train"], batch_size=32, shuffle=True, seed=0):
        batch = TokenErasure(rate=None)(batch.to(device), epoch=epoch)
"""
from .alignment import word_align
from .batch import MODALITIES, Batch, lengths_to_padding_mask
from .dataset import MMSADataset, SplitRows, collate, concat_batches, iterate_batches, make_loader, select_rows
from .mag import read_mag, to_mag
from .missing import (
    INCOMPLETE_PATTERNS,
    PATTERNS,
    MissingProtocol,
    ModalityDrop,
    PatternAvailability,
    TokenErasure,
    generate_missing_matrix,
    official_lnln_masks,
    parse_missing,
)
from .mmsa import load_mmsa, validate_split
from .preflight import PreflightError, PreflightResult, preflight, preflight_problems
from .safe_pickle import UnsafePickleError, safe_load, safe_loads
from .specs import DATASETS, DatasetSpec, get_dataset_spec
from .synthetic import save_mmsa, synthetic

__all__ = [
    "Batch", "MODALITIES", "lengths_to_padding_mask",
    "load_mmsa", "validate_split", "synthetic", "save_mmsa", "read_mag", "to_mag",
    "MMSADataset", "collate", "make_loader", "word_align",
    "SplitRows", "iterate_batches", "select_rows", "concat_batches",
    "MissingProtocol", "TokenErasure", "ModalityDrop", "PatternAvailability", "parse_missing", "PATTERNS",
    "INCOMPLETE_PATTERNS", "generate_missing_matrix", "official_lnln_masks",
    "DATASETS", "DatasetSpec", "get_dataset_spec",
    "safe_load", "safe_loads", "UnsafePickleError",
    "preflight", "preflight_problems", "PreflightResult", "PreflightError",
]
