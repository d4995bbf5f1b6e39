"""``MMSADataset`` over one validated split, ``collate`` → ``Batch``, and a seeded ``make_loader``.

Indexing with a list of rows (``dataset[[3, 7, 9]]``) builds a whole ``Batch`` by fancy indexing, which is what
``make_loader`` uses (no per-sample Python work on the hot path); ``dataset[i]`` returns one sample dict and
``collate(list_of_samples)`` stacks them into the same ``Batch``.

``SplitRows`` / ``iterate_batches``: row access to, and in-order fixed-size iteration over, a (train) split given in
any form a trainer has at hand (``MMSADataset``, split dict, DataLoader, whole-split ``Batch``, iterable of
``Batch``): what models that re-encode the train split (HME's memory bank, DashFusion's partners) share.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from .batch import Batch
from .mmsa import validate_split

__all__ = ["MMSADataset", "SplitRows", "collate", "concat_batches", "iterate_batches", "make_loader", "select_rows"]

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
        if "domain" in split_dict:  # DG protocol: per-sample domain id (msa_fast.data.harmonise)
            self.tensors["domain"] = torch.as_tensor(np.asarray(split_dict["domain"], dtype=np.int64))
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
                 text_features=t.get("text_features"), labels_unimodal=unimodal, domain=t.get("domain"))


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


# ---------------------------------------------------------------------------------------------------------------
# Row access to a whole split (re-encoding the train split, partner lookup)
# ---------------------------------------------------------------------------------------------------------------
def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """The sub-batch of ``rows`` (positions in ``batch``; any order, repeats allowed)."""
    b = batch.batch_size
    changes: dict[str, Any] = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b:
            changes[f.name] = v[rows.to(v.device)]
        elif isinstance(v, list) and len(v) == b:
            changes[f.name] = [v[i] for i in rows.tolist()]
        elif isinstance(v, dict):
            changes[f.name] = {k: t[rows.to(t.device)] for k, t in v.items()}
        elif isinstance(v, Batch):
            changes[f.name] = select_rows(v, rows)
    return batch.replace(**changes)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate along the batch dim; text fields are right-padded with zeros to the widest batch."""
    if not batches:
        raise ValueError("concat_batches needs at least one Batch")
    first = batches[0]
    changes: dict[str, Any] = {}
    width = max(b.text_ids.shape[1] for b in batches)
    for f in fields(first):
        vals = [getattr(b, f.name) for b in batches]
        v0 = vals[0]
        if isinstance(v0, Tensor):
            if f.name.startswith("text_"):
                vals = [_pad_dim1(v, width) for v in vals]
            changes[f.name] = torch.cat(vals, dim=0)
        elif isinstance(v0, list):
            changes[f.name] = [x for v in vals for x in v]
        elif v0 is None:
            if any(v is not None for v in vals):
                raise ValueError(f"cannot concatenate batches where only some have {f.name!r}")
        elif isinstance(v0, dict):
            changes[f.name] = {k: torch.cat([v[k] for v in vals]) for k in v0}
        elif isinstance(v0, Batch):
            changes[f.name] = concat_batches(vals)
    return first.replace(**changes)


def _pad_dim1(x: Tensor, width: int) -> Tensor:
    if x.shape[1] == width:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, width - x.shape[1]]
    return F.pad(x, pad)


class SplitRows:
    """Row access to a split by row number (= ``Batch.index`` for ``MMSADataset`` splits).

    ``data``: an ``MMSADataset`` or a split dict (wrapped in one), or a dataset / DataLoader over one whose
    ``dataset[list_of_rows]`` returns a ``Batch`` (read lazily, nothing copied); a whole-split ``Batch`` (row =
    position); otherwise any iterable of ``Batch`` covering the split, gathered once on the CPU with each sample
    placed at row ``Batch.index`` (the indices must be a permutation of 0..N−1).
    """

    def __init__(self, data: Union[MMSADataset, Mapping[str, Any], Batch, Any]):
        self._dataset: Any = None
        self._split: Optional[Batch] = None
        if isinstance(data, Batch):
            self._split = data
            return
        if isinstance(data, Mapping):
            data = MMSADataset(data)
        ds = getattr(data, "dataset", data)
        if isinstance(ds, MMSADataset) or _is_row_indexable(ds):
            self._dataset = ds
            return
        if not hasattr(data, "__iter__"):
            raise TypeError("data must be an MMSADataset, a split dict, a DataLoader, a Batch or an iterable of "
                            f"Batch, got {type(data).__name__}")
        batches = list(data)
        if not batches or not all(isinstance(b, Batch) for b in batches):
            raise TypeError("data must iterate to Batch objects (a non-empty iterable of Batch), got "
                            f"{sorted({type(b).__name__ for b in batches}) or 'nothing'}")
        split = concat_batches([b.to("cpu") for b in batches])
        n = split.batch_size
        if not torch.equal(split.index.sort().values, torch.arange(n)):
            raise ValueError(f"the batches' index must be a permutation of 0..{n - 1} (each sample exactly once)")
        order = torch.empty_like(split.index)
        order[split.index] = torch.arange(n)
        self._split = select_rows(split, order)

    def __len__(self) -> int:
        return self._split.batch_size if self._split is not None else len(self._dataset)

    def rows(self, rows: Tensor) -> Batch:
        """(n,) int64 rows → the ``Batch`` of those samples (in that order, on the CPU)."""
        rows = torch.as_tensor(rows).cpu().long()
        if self._split is not None:
            return select_rows(self._split, rows)
        return self._dataset[rows.tolist()]

    def batches(self, batch_size: int = 128, device: Union[str, torch.device, None] = None) -> Iterator[Batch]:
        """The split in row order, ``batch_size`` rows at a time (the last batch may be smaller), moved to
        ``device`` when given."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = len(self)
        for start in range(0, n, batch_size):
            b = self.rows(torch.arange(start, min(start + batch_size, n)))
            yield b if device is None else b.to(device)


def iterate_batches(data: Union[MMSADataset, Mapping[str, Any], Batch, Any], batch_size: int = 128,
                    device: Union[str, torch.device, None] = None) -> Iterator[Batch]:
    """A split (any form ``SplitRows`` accepts) in row order, ``batch_size`` rows at a time, on ``device``."""
    return SplitRows(data).batches(batch_size, device)


def _is_row_indexable(ds: Any) -> bool:
    """Whether ``ds[[0]]`` returns a ``Batch`` (list indexing as ``MMSADataset``)."""
    if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")) or isinstance(ds, (list, tuple)):
        return False
    try:
        return len(ds) > 0 and isinstance(ds[[0]], Batch)
    except Exception:  # noqa: BLE001 - any failure means: not list-indexable, fall back to gathering
        return False
