"""``MMSADataset`` over one validated split, ``collate`` → ``Batch``, and a seeded ``make_loader``.

Indexing with a list of rows (``dataset[[3, 7, 9]]``) builds a whole ``Batch`` by fancy indexing, which is what
``make_loader`` uses (no per-sample Python work on the hot path); ``dataset[i]`` returns one sample dict and
``collate(list_of_samples)`` stacks them into the same ``Batch``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .batch import Batch
from .mmsa import validate_split

__all__ = ["MMSADataset", "collate", "make_loader"]

_TENSOR_KEYS = ("text_ids", "text_attention_mask", "text_segment_ids", "audio", "vision", "audio_lengths",
                "vision_lengths", "labels", "index")


class MMSADataset(Dataset):
    """Torch dataset over one split dict (MMSA keys).

    The split is validated (``msa_fast.data.mmsa.validate_split``) unless ``validate=False`` (for dicts that
    ``load_mmsa`` already returned). Arrays are shared with the dict (no copy) where dtypes allow.

    Args:
        split_dict: ``{key: array}`` of one split.
        use_text_features: put the ``text`` key (precomputed BERT features) into ``Batch.text_features``; only
            possible when the key exists (None = when it exists).
    """

    def __init__(self, split_dict: Mapping[str, Any], use_text_features: Optional[bool] = None,
                 validate: bool = True, split: str = "split"):
        if validate:
            split_dict, _ = validate_split(split_dict, split)
        if use_text_features and "text" not in split_dict:
            raise ValueError("use_text_features=True but the split has no 'text' key (precomputed BERT features)")
        if use_text_features is None:
            use_text_features = "text" in split_dict
        tb = torch.as_tensor(np.asarray(split_dict["text_bert"])).long()
        self.tensors: dict[str, Tensor] = {
            "text_ids": tb[:, 0].contiguous(),
            "text_attention_mask": tb[:, 1].contiguous(),
            "text_segment_ids": tb[:, 2].contiguous(),
            "audio": torch.from_numpy(np.ascontiguousarray(split_dict["audio"], dtype=np.float32)),
            "vision": torch.from_numpy(np.ascontiguousarray(split_dict["vision"], dtype=np.float32)),
            "labels": torch.from_numpy(np.asarray(split_dict["regression_labels"], dtype=np.float32).reshape(-1)),
        }
        n = self.tensors["labels"].shape[0]
        self.tensors["index"] = torch.arange(n)
        for m, key in (("audio", "audio_lengths"), ("vision", "vision_lengths")):
            if key in split_dict:
                self.tensors[key] = torch.as_tensor(np.asarray(split_dict[key], dtype=np.int64))
            else:  # aligned file: all frames valid
                self.tensors[key] = torch.full((n,), self.tensors[m].shape[1], dtype=torch.int64)
        if use_text_features:
            self.tensors["text_features"] = torch.from_numpy(
                np.ascontiguousarray(split_dict["text"], dtype=np.float32))
        self.unimodal_keys = [m for m in "TAV" if f"regression_labels_{m}" in split_dict]
        for m in self.unimodal_keys:
            self.tensors[f"labels_{m}"] = torch.from_numpy(
                np.asarray(split_dict[f"regression_labels_{m}"], dtype=np.float32).reshape(-1))
        self.ids = [str(v) for v in split_dict["id"]] if "id" in split_dict else [str(i) for i in range(n)]
        self.raw_text = [str(v) for v in split_dict["raw_text"]] if "raw_text" in split_dict else [""] * n

    def __len__(self) -> int:
        return int(self.tensors["labels"].shape[0])

    def __getitem__(self, index):
        """int → one sample dict (tensors without batch dim); list/array/tensor of ints → a ``Batch``."""
        if isinstance(index, (int, np.integer)):
            i = int(index)
            if not -len(self) <= i < len(self):
                raise IndexError(f"index {i} out of range for a split of {len(self)} samples")
            i %= len(self)
            sample = {k: v[i] for k, v in self.tensors.items()}
            sample["id"], sample["raw_text"] = self.ids[i], self.raw_text[i]
            return sample
        rows = torch.as_tensor(np.asarray(index, dtype=np.int64))
        return _to_batch({k: v[rows] for k, v in self.tensors.items()},
                         [self.ids[i] for i in rows.tolist()], [self.raw_text[i] for i in rows.tolist()])


def _to_batch(t: Mapping[str, Tensor], ids: list[str], raw_text: list[str]) -> Batch:
    unimodal = {m: t[f"labels_{m}"] for m in "TAV" if f"labels_{m}" in t} or None
    return Batch(**{k: t[k] for k in _TENSOR_KEYS}, ids=ids, raw_text=raw_text,
                 text_features=t.get("text_features"), labels_unimodal=unimodal)


def collate(samples: Sequence[Mapping[str, Any]]) -> Batch:
    """Stack sample dicts from ``MMSADataset.__getitem__(int)`` into a ``Batch``."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    keys = [k for k in samples[0] if k not in ("id", "raw_text")]
    stacked = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in keys}
    return _to_batch(stacked, [s["id"] for s in samples], [s["raw_text"] for s in samples])


def _identity(x):
    return x


def make_loader(split_dict: Mapping[str, Any] | MMSADataset, batch_size: int, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False, num_workers: int = 0, **dataset_kwargs) -> DataLoader:
    """A ``DataLoader`` yielding ``Batch`` objects (whole batches by fancy indexing).

    Shuffling uses a ``torch.Generator`` seeded with ``seed``: the order of epoch e is a function of (seed, e)
    (the generator advances once per epoch), independent of the global RNG. Unlike MMSA, valid/test loaders
    should be created with ``shuffle=False``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    dataset = split_dict if isinstance(split_dict, MMSADataset) else MMSADataset(split_dict, **dataset_kwargs)
    if shuffle:
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        sampler = RandomSampler(dataset, generator=gen)
    else:
        sampler = SequentialSampler(dataset)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(dataset, sampler=batches, batch_size=None, collate_fn=_identity, num_workers=num_workers)
