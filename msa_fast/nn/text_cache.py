"""Features of a frozen text encoder (BERT), computed once per sample and cached.

A model whose BERT is frozen (``freeze_bert=True``) feeds the same token ids to the same weights every epoch; the
features are a pure function of (token ids, attention mask, segment ids, width, weights) as long as BERT runs in
eval mode (dropout off). ``TextFeatureCache`` stores them so that each sample goes through BERT once, not once per
epoch.

Model options (DashFusion, HME, LNLN, MMCL; same names and meaning in each config)
--------------------------------------------------------------------------------
- ``freeze_bert`` (bool, default False = the official fine-tuning, unchanged): BERT's parameters get
  ``requires_grad=False`` (the trainer's ``build_optimizer`` leaves them out of the optimizer), BERT stays in eval
  mode even when the model is in train mode (``model.train()`` does not switch it back) and runs under ``no_grad``.
  BERT's weights stay in the ``state_dict`` (checkpoints are unchanged); the cache is a plain attribute, never saved.
  ``freeze_bert=True`` with ``use_text_features=True`` is a ValueError: precomputed features already are frozen
  BERT features, there is no BERT to freeze.
- ``bert_feature_cache`` (bool, default True; read only when ``freeze_bert``): the features come from a
  ``TextFeatureCache`` (False = run the frozen BERT on every step: the same numbers, no memory).
- ``bert_feature_cache_max_entries`` (positive int or None = unbounded, default None): the least recently used
  entries are dropped beyond it. Unbounded is fine for MOSI / SIMS (2.2k / 2.3k samples × 50 × 768 float32
  ≈ 0.35 GB) and acceptable for MOSEI (22.9k samples ≈ 3.5 GB) on a GPU of today; set a bound on smaller devices.
DashFusion adds ``frozen_bert_width`` ("padded" or "batch", see its module docstring): its fine-tuned BERT runs on the
text cropped to the batch's longest sample, which changes from batch to batch, and features computed at two widths
differ by float rounding, so a cache keyed on the width would rarely hit. "padded" (default) runs the frozen BERT on
the full padded width and crops afterwards: one pass per sample, whatever the batch.

Key
---
An entry is keyed by

- the **sample key**: ``Batch.ids[i]`` (the MMSA sample id) when the batch carries ids, else ``Batch.index[i]`` (the
  row of the sample in its split; a ``Batch`` does not know its split, so train row 3 and test row 3 share a sample
  key — they are different *variants* of it, see below; MMSA pickles and the synthetic data always carry ids);
- a **fingerprint of the row's inputs**: BLAKE2b of the row's token ids, attention mask and segment ids over the
  requested width (padding included). A different text under the same id (a token-erasure protocol, LNLN's
  incomplete view, a re-tokenised dataset) never hits: a hit means identical inputs;
- the **width** L of the call (``ids.shape[1]``): BERT's outputs at the valid positions change by float rounding
  (~1e-6) with the amount of padding that follows, so only a call of the same width hits (bit-exact);
- the **context**: device type and autocast state (features computed in bfloat16 autocast are not served to a
  float32 call);
- the **weights digest**: BLAKE2b of every parameter and buffer of the encoder (names, dtypes, shapes, bytes),
  computed on first use and recomputed whenever a parameter / buffer is replaced or changed in place (its
  ``_version`` moves: ``load_state_dict``, an optimizer step, an edit under ``no_grad``). The cache holds one weights
  version at a time: a changed digest empties it (loading the same weights again keeps it).

Each sample key holds at most ``max_variants`` (default 2) entries (fingerprint × width × context), least recently
used dropped first: the complete text and one variant (an erased copy, another width) without unbounded growth when
a protocol redraws its erasures every epoch. ``max_entries`` bounds the whole cache (LRU), default unbounded.

Exactness
---------
Misses are computed in one encoder call on the missing rows only (duplicates once), in eval mode under ``no_grad``.
In eval mode the cached features equal a fresh forward of the same rows at the same width bit for bit when the
encoder's kernels compute each row independently of the other rows of the batch (true of PyTorch's CPU kernels for
BERT, checked by ``tests/test_text_cache.py``). On CUDA, cuBLAS may pick a different GEMM algorithm for a different
number of rows, so a row computed in a smaller (miss-only) batch may differ from the full-batch call by float rounding.

Storage: ``storage="device"`` (default) keeps each row's (L, H) features on the device they were computed on (no
transfer when served); ``"cpu"`` keeps them in host memory (copied to the device per batch: 16 × 50 × 768 float32 =
2.4 MB). The cache costs one device→host copy of the (B, L) token ids per call (the fingerprints are computed on the
host). Pickling / deep-copying a cache gives an empty one (features are derived state).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Hashable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["TextFeatureCache", "FREEZE_DEFAULTS", "sample_keys", "eval_no_grad", "frozen_text_features",
           "freeze_options", "freeze_module", "hf_last_hidden_state"]

#: The model config keys (and defaults) that control a frozen BERT; see the module docstring.
FREEZE_DEFAULTS: dict[str, Any] = {"freeze_bert": False, "bert_feature_cache": True,
                                   "bert_feature_cache_max_entries": None}
STORAGES = ("device", "cpu")

Encode = Callable[[Tensor, Tensor, Tensor], Tensor]


def hf_last_hidden_state(module: nn.Module) -> Encode:
    """``(ids, mask, segments) -> last_hidden_state`` of a ``transformers.BertModel``."""
    return lambda ids, mask, seg: module(input_ids=ids, attention_mask=mask, token_type_ids=seg)[0]


def sample_keys(batch: Any, rows: Optional[Tensor] = None) -> list[Hashable]:
    """Sample keys of a ``Batch`` (of its ``rows`` when given): ``("id", Batch.ids[i])`` when the batch carries one id
    per sample, else ``("index", Batch.index[i])`` (see the module docstring)."""
    n = int(batch.text_ids.shape[0])
    if len(batch.ids) == n:
        keys: list[Hashable] = [("id", str(s)) for s in batch.ids]
    else:
        keys = [("index", int(i)) for i in batch.index.tolist()]
    if rows is not None:
        keys = [keys[i] for i in rows.tolist()]
    return keys


@contextmanager
def eval_no_grad(module: nn.Module) -> Iterator[None]:
    """``module`` (and every sub-module) in eval mode under ``torch.no_grad()``; the previous modes are restored."""
    modes = [(m, m.training) for m in module.modules() if m.training]
    for m, _ in modes:
        m.training = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


#: Attribute ``freeze_module`` sets on a frozen module: ``MSAModel.train()`` puts every module carrying it back in
#: eval mode (a frozen encoder's dropout would otherwise perturb features that are meant to be fixed and cached).
FROZEN_EVAL_FLAG = "_msa_fast_frozen_eval"


def freeze_module(module: nn.Module) -> None:
    """``requires_grad=False`` on every parameter and eval mode, kept by the owning ``MSAModel.train()``."""
    for p in module.parameters():
        p.requires_grad_(False)
    setattr(module, FROZEN_EVAL_FLAG, True)
    module.eval()


def freeze_options(config: Mapping[str, Any], has_text_encoder: bool) -> tuple[bool, Optional["TextFeatureCache"]]:
    """Validate the ``FREEZE_DEFAULTS`` options of a model config: (freeze BERT?, its cache or None).

    Raises ValueError naming the option for a wrong type or value, and for ``freeze_bert=True`` without a BERT
    (``use_text_features=True``)."""
    c = {**FREEZE_DEFAULTS, **{k: config[k] for k in FREEZE_DEFAULTS if k in config}}
    for key in ("freeze_bert", "bert_feature_cache"):
        if not isinstance(c[key], bool):
            raise ValueError(f"{key} must be true or false, got {c[key]!r}")
    size = c["bert_feature_cache_max_entries"]
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"bert_feature_cache_max_entries must be a positive int or None, got {size!r}")
    if not c["freeze_bert"]:
        return False, None
    if not has_text_encoder:
        raise ValueError("freeze_bert=True needs use_text_features=False: with use_text_features=True the model "
                         "reads precomputed text features (already frozen BERT features) and has no BERT to freeze")
    return True, (TextFeatureCache(max_entries=size) if c["bert_feature_cache"] else None)


def frozen_text_features(module: nn.Module, ids: Tensor, mask: Tensor, segments: Tensor,
                         keys: Sequence[Hashable], cache: Optional["TextFeatureCache"] = None,
                         encode: Optional[Encode] = None, store: Union[None, bool, Tensor, Sequence[bool]] = None
                         ) -> Tensor:
    """(B, L, H) features of a frozen encoder in eval mode under ``no_grad``: through ``cache`` when given, else one
    plain call (the same numbers, see the module docstring)."""
    if cache is not None:
        return cache(module, ids, mask, segments, keys, encode=encode, store=store)
    encode = encode or hf_last_hidden_state(module)
    with eval_no_grad(module):
        return encode(ids, mask, segments)


def _context(device: torch.device) -> tuple:
    kind = device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
        dtype = torch.get_autocast_dtype(kind) if enabled else None
    except (TypeError, RuntimeError, AttributeError):  # older torch / device types without autocast
        enabled, dtype = torch.is_autocast_enabled(), None
    return kind, bool(enabled), str(dtype)


def _named_tensors(module: nn.Module) -> list[tuple[str, Tensor]]:
    return list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))


def weights_digest(module: nn.Module) -> str:
    """BLAKE2b (128 bits, hex) of every parameter and buffer of ``module``: names, dtypes, shapes and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(_named_tensors(module), key=lambda kv: kv[0]):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1).contiguous().cpu()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


class TextFeatureCache:
    """Cache of a frozen text encoder's per-sample features (see the module docstring for the key, exactness and
    memory).

    ``cache(module, ids, mask, segments, keys)`` → (B, L, H), equal to ``module`` run on the same inputs in eval
    mode. ``stats`` counts ``calls``, ``hits`` / ``misses`` (rows), ``encoder_calls``, ``rows_encoded`` and
    ``digests`` (weights digests computed).
    """

    def __init__(self, max_entries: Optional[int] = None, max_variants: int = 2, storage: str = "device"):
        if max_entries is not None and (isinstance(max_entries, bool) or not isinstance(max_entries, int)
                                        or max_entries < 1):
            raise ValueError(f"max_entries must be a positive int or None, got {max_entries!r}")
        if isinstance(max_variants, bool) or not isinstance(max_variants, int) or max_variants < 1:
            raise ValueError(f"max_variants must be a positive int, got {max_variants!r}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        self.max_entries, self.max_variants, self.storage = max_entries, max_variants, storage
        self._init_state()

    def _init_state(self) -> None:
        self._entries: "OrderedDict[tuple, Tensor]" = OrderedDict()  # (sample, fingerprint, width, ctx) -> (L, H)
        self._variants: dict[Hashable, list[tuple]] = {}  # sample key -> its entry keys, least recently used first
        self._digest: Optional[str] = None
        self._watched: Optional[list[tuple[Tensor, int]]] = None  # (tensor, _version) at the last digest
        self.stats = dict(calls=0, hits=0, misses=0, encoder_calls=0, rows_encoded=0, digests=0)

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every entry (the weights digest is kept)."""
        self._entries.clear()
        self._variants.clear()

    def __getstate__(self) -> dict:  # pickle / deepcopy: settings only, an empty cache
        return {"max_entries": self.max_entries, "max_variants": self.max_variants, "storage": self.storage}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_state()

    def __repr__(self) -> str:
        return (f"TextFeatureCache(entries={len(self)}, max_entries={self.max_entries}, "
                f"max_variants={self.max_variants}, storage={self.storage!r})")

    def weights_digest(self, module: nn.Module) -> str:
        """The digest of ``module``'s weights, recomputed only when a parameter / buffer was replaced or changed in
        place since the last one; a new digest empties the cache."""
        tensors = [t for _, t in _named_tensors(module)]
        watched = self._watched
        if watched is None or len(watched) != len(tensors) or any(
                t is not w or t._version != v for t, (w, v) in zip(tensors, watched)):
            digest = weights_digest(module)
            self.stats["digests"] += 1
            if digest != self._digest:
                self.clear()
                self._digest = digest
            self._watched = [(t, t._version) for t in tensors]
        return self._digest

    def _insert(self, key: tuple, value: Tensor) -> None:
        sample = key[0]
        variants = self._variants.setdefault(sample, [])
        variants.append(key)
        self._entries[key] = value
        while len(variants) > self.max_variants:
            self._entries.pop(variants.pop(0), None)
        while self.max_entries is not None and len(self._entries) > self.max_entries:
            old, _ = self._entries.popitem(last=False)
            rest = self._variants.get(old[0])
            if rest is not None:
                rest.remove(old)
                if not rest:
                    del self._variants[old[0]]

    def _touch(self, key: tuple) -> None:
        self._entries.move_to_end(key)
        variants = self._variants[key[0]]
        variants.remove(key)
        variants.append(key)

    # ---- lookup ----------------------------------------------------------------------------------------------
    def __call__(self, module: nn.Module, ids: Tensor, mask: Tensor, segments: Tensor, keys: Sequence[Hashable],
                 encode: Optional[Encode] = None, store: Union[None, bool, Tensor, Sequence[bool]] = None) -> Tensor:
        """(B, L, H) features of ``ids`` / ``mask`` / ``segments`` (B, L): cached rows served, missing rows computed
        in one ``encode`` call (default: ``module``'s ``last_hidden_state``), in eval mode under ``no_grad``.

        ``keys``: one sample key per row (``sample_keys(batch)``). ``store`` (default True): whether to keep the
        computed rows, one flag per row or one for all (a model leaves out rows it will not see again)."""
        if ids.dim() != 2 or ids.shape != mask.shape or ids.shape != segments.shape:
            raise ValueError(f"ids, mask and segments must be (B, L) of one shape, got {tuple(ids.shape)}, "
                             f"{tuple(mask.shape)}, {tuple(segments.shape)}")
        b, width = ids.shape
        if len(keys) != b:
            raise ValueError(f"{len(keys)} sample keys for {b} rows")
        encode = encode or hf_last_hidden_state(module)
        self.stats["calls"] += 1
        self.weights_digest(module)
        ctx = _context(ids.device)
        host = torch.stack([ids, mask, segments], dim=1).to("cpu", torch.int64).contiguous().numpy()  # (B, 3, L)
        full = [(keys[i], hashlib.blake2b(host[i].tobytes(), digest_size=16).digest(), width, ctx) for i in range(b)]
        if store is None or isinstance(store, bool):
            keep = [store is not False] * b
        else:
            keep = [bool(s) for s in (store.tolist() if isinstance(store, Tensor) else store)]
            if len(keep) != b:
                raise ValueError(f"store has {len(keep)} flags for {b} rows")

        found: list[Optional[Tensor]] = []
        slot: dict[tuple, int] = {}  # missing key -> row of the encoder call
        missing: list[int] = []
        for i, k in enumerate(full):
            hit = self._entries.get(k)
            if hit is not None:
                self._touch(k)
                self.stats["hits"] += 1
            else:
                self.stats["misses"] += 1
                if k not in slot:
                    slot[k] = len(missing)
                    missing.append(i)
            found.append(hit)

        computed: Optional[Tensor] = None
        if missing:
            if len(missing) == b:
                args = (ids, mask, segments)
            else:
                rows = torch.tensor(missing, device=ids.device)
                args = (ids.index_select(0, rows), mask.index_select(0, rows), segments.index_select(0, rows))
            with eval_no_grad(module):
                computed = encode(*args)
            self.stats["encoder_calls"] += 1
            self.stats["rows_encoded"] += len(missing)
            for j, i in enumerate(missing):
                if keep[i]:
                    row = computed[j]
                    self._insert(full[i], row.to("cpu", copy=True) if self.storage == "cpu" else row.clone())
            if len(missing) == b:
                return computed
        device = ids.device
        return torch.stack([f.to(device, non_blocking=True) if f is not None else computed[slot[full[i]]]
                            for i, f in enumerate(found)])
