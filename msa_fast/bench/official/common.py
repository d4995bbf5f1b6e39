"""What the three adapters share: locating a user's checkout, importing it in isolation, the BERT / tokenizer
stand-ins patched into the official constructors, and the adapter interface.

Nothing here imports the official code at module level; the adapters import it from the user-given root at run
time (the official code is never part of msa_fast).
"""
from __future__ import annotations

import abc
import contextlib
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional
from unittest import mock

import torch
from torch import Tensor, nn


class OfficialRootError(ValueError):
    """--official-root does not point at a checkout of the method's official repository."""


def resolve_code_dir(root: Any, method: str, code_subdir: str, marker: str, repo: str) -> Path:
    """The directory the official code imports from (the repository root or its ``code_subdir``), given the
    repository root or that directory itself. Fails naming ``--official-root`` and what was looked for."""
    if root is None or str(root).strip() == "":
        raise OfficialRootError(f"--official-root is required: the path of a checkout of {repo} (the {method} "
                                "official code is not part of msa_fast)")
    path = Path(root).expanduser()
    if not path.exists():
        raise OfficialRootError(f"--official-root {str(root)!r} does not exist (expected a checkout of {repo})")
    if not path.is_dir():
        raise OfficialRootError(f"--official-root {str(root)!r} is not a directory (expected a checkout of {repo})")
    candidates = [path / code_subdir, path] if code_subdir else [path]
    for cand in candidates:
        if (cand / marker).is_file():
            return cand.resolve()
    wanted = f"{code_subdir}/{marker}" if code_subdir else marker
    raise OfficialRootError(f"--official-root {str(root)!r} is not a checkout of {repo}: {wanted} not found "
                            f"there (method {method})")


@contextlib.contextmanager
def isolated_import_path(code_dir: Path, top_level: Iterable[str]):
    """Import official modules from ``code_dir`` with generic top-level names (``config``, ``utils``, ``models``,
    …) without clashing with installed packages or another official repository: the names are taken out of
    ``sys.modules`` for the duration and put back afterwards (the imported modules stay alive through the
    objects that use them)."""
    names = set(top_level)

    def ours(key: str) -> bool:
        return key.split(".", 1)[0] in names

    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
    sys.path.insert(0, str(code_dir))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(code_dir))
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def require_modules(method: str, modules: Mapping[str, str]) -> None:
    """Fail with the pip command when a library the official code imports is missing."""
    import importlib.util

    missing = [pip for mod, pip in modules.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise RuntimeError(f"the official {method} code needs {', '.join(missing)}: pip install {' '.join(missing)}")


# ------------------------------------------------------------------------------------------------ BERT stand-ins
class FeaturesAsBert(nn.Module):
    """The ``features`` variant's BERT: returns the precomputed (B, L, 768) text features handed to it as
    ``inputs_embeds`` (DashFusion's tokenizer stand-in puts them there) in a ``last_hidden_state`` output."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None, **_):
        if inputs_embeds is None:
            raise RuntimeError("FeaturesAsBert got no inputs_embeds (the features variant's tokenizer stand-in "
                               "must supply them)")
        return {"last_hidden_state": inputs_embeds}


class PassThrough(nn.Module):
    """A text encoder that returns its input: the official model is handed the precomputed features in place of
    the text (LNLN's ``bertmodel``, HME's ``bert``)."""

    def forward(self, x, *_, **__):
        return x


class NoTokenizer:
    """What ``BertTokenizer.from_pretrained`` returns here: the official code either never calls it (LNLN) or gets a
    :class:`RowTokenizer` installed before its first forward (DashFusion)."""

    def __call__(self, *_, **__):
        raise RuntimeError("the official tokenizer was not replaced by the harness's RowTokenizer")


@contextlib.contextmanager
def patched_from_pretrained(bert_config: Mapping[str, Any], features: bool):
    """``BertModel.from_pretrained`` → a randomly initialised BERT built by msa_fast from ``bert_config`` (the
    same path as our models' BERT: same attention implementation), or :class:`FeaturesAsBert` when ``features``;
    ``BertTokenizer.from_pretrained`` → :class:`NoTokenizer`. Nothing is downloaded."""
    from transformers import BertModel, BertTokenizer

    from ...nn.text_encoder import build_bert

    def model_from_pretrained(*_args, **kwargs):
        if features:
            return FeaturesAsBert()
        return build_bert(dict(bert_config), add_pooling_layer=kwargs.get("add_pooling_layer", True))

    def tokenizer_from_pretrained(*_args, **_kwargs):
        return NoTokenizer()

    with mock.patch.object(BertModel, "from_pretrained", model_from_pretrained), \
            mock.patch.object(BertTokenizer, "from_pretrained", tokenizer_from_pretrained):
        yield


class _Encoding(dict):
    """A ``BatchEncoding`` look-alike: a dict of tensors with ``.to(device)``."""

    def to(self, device):
        return _Encoding({k: v.to(device) for k, v in self.items()})


class RowTokenizer:
    """Stand-in for DashFusion's in-forward tokenizer: each text of a batch maps to exactly the token ids (and, in
    the ``features`` variant, the text features) of its row in msa_fast's batch. Called as the official code calls
    the real one (``padding=True, truncation=True, max_length=128, return_tensors="pt"``): right-padded with 0 to
    the longest text of the call, attention mask 1 on the tokens, segment ids 0."""

    def __init__(self, table: Mapping[str, Mapping[str, Tensor]]):
        self.table = dict(table)

    def __call__(self, texts, padding=True, truncation=True, max_length: Optional[int] = 128, return_tensors="pt",
                 **_):
        if isinstance(texts, str):
            texts = [texts]
        try:
            rows = [self.table[t] for t in texts]
        except KeyError as err:
            raise KeyError(f"RowTokenizer: text {err.args[0]!r} is not in this batch") from None
        ids = [r["input_ids"] for r in rows]
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        n = max(len(x) for x in ids)
        out_ids = torch.zeros(len(ids), n, dtype=torch.long)
        mask = torch.zeros(len(ids), n, dtype=torch.long)
        for i, x in enumerate(ids):
            out_ids[i, :len(x)] = x
            mask[i, :len(x)] = 1
        enc = _Encoding(input_ids=out_ids, token_type_ids=torch.zeros_like(out_ids), attention_mask=mask)
        if "features" in rows[0]:
            feats = rows[0]["features"]
            emb = feats.new_zeros(len(rows), n, feats.shape[-1])
            for i, r in enumerate(rows):
                emb[i, :len(ids[i])] = r["features"][:len(ids[i])]
            enc["inputs_embeds"] = emb
        return enc


def row_texts(batch, features: bool = False) -> tuple[list[str], dict[str, dict[str, Tensor]]]:
    """(texts, table) for :class:`RowTokenizer`: one text per row of ``batch`` — its ``raw_text`` where that
    identifies the row's token ids, else the words ``w<id>`` of its ids — and text → {"input_ids" (n,),
    ["features" (n, D)]} over the row's valid tokens (the attention mask must be a prefix, as MMSA's is)."""
    ids, mask = batch.text_ids.cpu(), batch.text_attention_mask.cpu().bool()
    if features and batch.text_features is None:
        raise ValueError("the features variant needs batch.text_features")
    texts: list[str] = []
    table: dict[str, dict[str, Tensor]] = {}
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        if not bool(mask[i, :n].all()):
            raise ValueError(f"row {i}: the text attention mask is not a prefix (cannot be a tokenizer's output)")
        valid = ids[i, :n].clone()
        text = batch.raw_text[i] if batch.raw_text and i < len(batch.raw_text) else None
        if text is None or (text in table and not torch.equal(table[text]["input_ids"], valid)):
            text = " ".join(f"w{k}" for k in valid.tolist())
            while text in table and not torch.equal(table[text]["input_ids"], valid):
                text += " "  # a raw_text that happens to spell another row's ids: keep the rows apart
        entry = {"input_ids": valid}
        if features:
            entry["features"] = batch.text_features[i, :n].detach().cpu()
        table[text] = entry
        texts.append(text)
    return texts, table


def frame_padding_mask(lengths: Tensor, n_frames: int) -> Tensor:
    """(B,) valid frame counts → (B, n_frames + 1) bool, True = padding: DashFusion's loader mask with its [CLS]
    column (a copy of frame 0's, which is never padding)."""
    pad = torch.arange(n_frames, device=lengths.device)[None] >= lengths[:, None]
    pad[:, 0] = False
    return torch.cat([pad[:, :1], pad], dim=1)


def no_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The official BERT-era groups (DashFusion ``train.py``, HME ``train_epoch``): no decay where the parameter name
    contains ``bias`` or ``LayerNorm.weight``; every named parameter, as the official lists take them."""
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------------ adapter API
class OfficialAdapter(abc.ABC):
    """One method's official side. Subclasses set the class attributes and implement the four steps."""

    method = ""
    repo = ""  # owner/name
    commit = ""  # the commit the parity fixtures and specs were made from
    code_subdir = ""  # where the official modules import from, relative to the repository root
    marker = ""  # a file that identifies the checkout, relative to the code directory
    top_level: tuple[str, ...] = ()  # top-level module names the official code defines
    needs: dict[str, str] = {}  # import name → pip name of the libraries its modules import
    optimizer_note = ""
    step_note = ""

    def __init__(self, root: Any, device: str = "cpu"):
        self.code_dir = resolve_code_dir(root, self.method, self.code_subdir, self.marker, self.repo)
        self.device = torch.device(device)
        self.notes: list[str] = []

    # overridden -------------------------------------------------------------------------------------------------
    def our_overrides(self, features: bool) -> dict[str, Any]:
        """Config overrides of our model for the variant (beyond ``work="equal"``)."""
        return {"use_text_features": True} if features else {}

    @abc.abstractmethod
    def build(self, bert_config: Mapping[str, Any], features: bool, seed: int) -> nn.Module:
        ...

    @abc.abstractmethod
    def inputs(self, batch, features: bool, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        ...

    @abc.abstractmethod
    def predict(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        """The official prediction (B,) of an eval-mode forward (dropout off, deterministic), no grad."""
        ...

    @abc.abstractmethod
    def make_step(self, model: nn.Module, inputs: Mapping[str, Any]) -> Callable[[], Any]:
        """The official training step on ``inputs`` as a no-argument callable (optimizer built once)."""
        ...

    def step_extras(self, ours: nn.Module, batch) -> dict[str, Any]:
        """What the official step needs from our side to see the same inputs (DashFusion: the partner rows our
        model drew). Picklable."""
        return {}
