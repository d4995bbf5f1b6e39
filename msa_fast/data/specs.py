"""Per-dataset facts (MMSA processed pickles): splits, sequence lengths, feature dims, label range.

The first layer of the configuration stack dataset → model → model×dataset (as in MMSA's
``config_regression.json``). Shapes are those of the arrays in the pickles (MMSA's JSON ``seq_lens`` are
unreliable, so the arrays are what we trust and validate against).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    splits: tuple[int, int, int]  # train / valid / test sizes of the real dataset
    text_len: int  # L_t of text_bert / text
    audio_len: int  # unaligned L_a
    vision_len: int  # unaligned L_v
    audio_dim: int
    vision_dim: int
    text_dim: int = 768
    label_range: tuple[float, float] = (-3.0, 3.0)
    unimodal_labels: bool = False  # SIMS carries regression_labels_T/_A/_V
    language: str = "en"
    aligned_available: bool = True

    def seq_lens(self, aligned: bool = False) -> tuple[int, int, int]:
        """(L_t, L_a, L_v) of the aligned_50 or unaligned file."""
        if aligned:
            if not self.aligned_available:
                raise ValueError(f"dataset {self.name!r} has no aligned version")
            return (self.text_len, self.text_len, self.text_len)
        return (self.text_len, self.audio_len, self.vision_len)


DATASETS: dict[str, DatasetSpec] = {
    "mosi": DatasetSpec("mosi", (1284, 229, 686), 50, 375, 500, 5, 20),
    "mosei": DatasetSpec("mosei", (16326, 1871, 4659), 50, 500, 500, 74, 35),
    "sims": DatasetSpec(
        "sims", (1368, 456, 457), 39, 400, 55, 33, 709, label_range=(-1.0, 1.0), unimodal_labels=True,
        language="zh", aligned_available=False,
    ),
}


def get_dataset_spec(name: str) -> DatasetSpec:
    key = name.lower()
    if key not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[key]
