"""The interface every drop-in model implements (what the trainer, the CLI and the benchmarks rely on).

A method lives in one package, ``msa_fast/models/<method>/``: ``model.py`` (the ``@register``-ed ``MSAModel``
subclasses), its layers, its extras, and optionally ``bench.py`` with the benchmark input factory
``setup(batch_size=16, dataset="mosi", full_bert=False, seed=0, device=None, work="fast", **overrides)
-> (model, batch)``. The registry finds
it by scanning the ``msa_fast.models`` packages; nothing outside the folder names the method. What the trainer needs
from a method is declared here, on ``MSAModel``:

- ``TINY_CONFIG``: overrides of the smallest configuration (tests, ``--smoke``, the demo);
- ``training_step`` / ``loss`` / ``forward``: the objective;
- ``optimizer_param_groups()``: parameter groups of the optimizer (e.g. a no-decay rule);
- ``prepare_epoch(epoch, train_data)``: per-epoch cross-sample work (partner retrieval, recording the train split);
- ``epoch_state()`` / ``load_epoch_state()``: what that work carries across epochs (checkpointed for exact resume);
- ``refresh_train_state(train_data)``: state derived from the train split with the current weights (a memory
  bank), rebuilt after weights are loaded (best checkpoint, ``eval``);
- ``prepare_evaluation()``: work before an evaluation pass that every rank runs together (collectives);
- ``bench_inputs(...)``: the benchmark factory (from the package's ``bench.py``).
"""
from __future__ import annotations

import abc
import importlib
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..data.batch import Batch
from ..distributed import BatchScope


class MSAModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class: ``forward(batch) -> {"M": (B,) prediction, ...intermediates}``.

    Subclasses implement ``forward`` and ``loss``; override ``training_step`` when the objective needs more than
    one forward (DashFusion's partners, LNLN's complete view), ``prepare_epoch`` for per-epoch work outside the
    step (partner retrieval, memory-bank refresh) and ``load_official_state_dict`` for parity with the official code.
    """

    model_name: str = ""
    CONFIGS: dict[str, dict[str, Any]] = {}
    #: Overrides (on top of the model×dataset config) of the smallest configuration that still runs every part of
    #: the model: used by the contract tests, ``msa-fast train --smoke`` and the demo. The tiny BERT is added by the
    #: caller (``msa_fast.nn.text_encoder.TINY_BERT_CONFIG``).
    TINY_CONFIG: dict[str, Any] = {"use_text_features": True}
    #: True when the training objective mixes the samples of a batch (partners, in-batch retrieval, contrastive
    #: terms): data-parallel training must then gather across ranks (``gathers_global_batch``).
    cross_sample_training: bool = False
    #: Where the architecture comes from when it is not the official code (e.g. "reconstruction, not the authors'
    #: code"): shown by ``msa-fast models`` and written next to the model name in results CSVs. "" = official.
    provenance: str = ""
    #: True when such a model gathers what it mixes across ranks — the step's rows through ``self.batch_scope``
    #: (``msa_fast.distributed.BatchScope``), its per-epoch passes through ``msa_fast.distributed`` — so that
    #: data-parallel training keeps the single-process objective. Required for ``cross_sample_training`` models
    #: under several ranks.
    gathers_global_batch: bool = False
    #: This training step's place in the global batch (set by the trainer for each step; default: the batch is
    #: the whole batch).
    batch_scope: BatchScope = BatchScope()

    def __init__(self, config: Mapping[str, Any]):
        super().__init__()
        self.config = dict(config)

    @abc.abstractmethod
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """``{"M": (B,) prediction, ...}``."""

    @abc.abstractmethod
    def loss(self, batch: Batch, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss": scalar, <term>: scalar, ...}`` of the full training objective."""

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        """One forward + objective; returns the loss dict plus ``"M"`` (the predictions, detached)."""
        outputs = self(batch)
        losses = self.loss(batch, outputs)
        losses["M"] = outputs["M"].detach()
        return losses

    def prepare_epoch(self, epoch: int, train_data: Any) -> None:
        """Hook called by the trainer before each training epoch (default: nothing)."""

    def epoch_state(self) -> dict[str, Any]:
        """What ``prepare_epoch`` carries from one epoch to the next besides parameters and buffers (e.g.
        DashFusion's partner pools, rebuilt only on odd epochs); the trainer stores it in ``last.pt`` so a resumed
        run continues exactly. Default: nothing."""
        return {}

    def load_epoch_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``epoch_state`` returned (default: nothing to restore)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no epoch state, got keys {sorted(state)}")

    def refresh_train_state(self, train_data: Any) -> None:
        """Rebuild state derived from the train split with the *current* weights that is not part of the state_dict
        (HME's memory bank). The trainer calls it after loading weights (best checkpoint, ``eval``). Default:
        nothing."""

    def prepare_evaluation(self) -> None:
        """Called by ``msa_fast.train.evaluate`` on every rank, in eval mode, before the first forward of an
        evaluation pass: the place for state that takes collectives to build (HME's memory bank is encoded here,
        1/world of the train split per rank), since a rank with an empty evaluation shard never calls forward.
        Default: nothing."""

    def train(self, mode: bool = True) -> "MSAModel":
        """``nn.Module.train``, except that modules frozen by ``msa_fast.nn.text_cache.freeze_module`` (a frozen
        BERT) stay in eval mode."""
        from ..nn.text_cache import FROZEN_EVAL_FLAG

        super().train(mode)
        for module in self.modules():
            if getattr(module, FROZEN_EVAL_FLAG, False):
                module.eval()
        return self

    def optimizer_param_groups(self) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
        """Parameter groups of the optimizer (``[{"params": [...], "weight_decay": ...}, ...]``); group keys the
        model leaves out take the trainer's settings. A dict ``{name: groups}`` declares several optimizers (e.g. a
        model, an actor and a critic), each with its own schedule, stepped and checkpointed together by the
        trainer (``msa_fast.train.OptimizerSet``). Default: one group with every parameter."""
        return [{"params": list(self.parameters())}]

    @classmethod
    def bench_inputs(cls, batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False, seed: int = 0,
                     device: Any = None, work: str = "fast", **overrides: Any) -> tuple["MSAModel", Batch]:
        """(model, batch) for the benchmarks: ``setup`` of the method package's ``bench.py``; ``work`` = ``"fast"``
        (the library's defaults) or ``"equal"`` (exactly the official step's work, see
        ``msa_fast.models.bench_factory``); ``overrides`` go to the model config."""
        package = cls.__module__.rsplit(".", 1)[0]
        try:
            factory = importlib.import_module(f"{package}.bench")
        except ModuleNotFoundError as err:
            if err.name != f"{package}.bench":
                raise
            raise TypeError(f"{cls.__name__} has no benchmark factory ({package}/bench.py with setup(...))") from None
        return factory.setup(batch_size=batch_size, dataset=dataset, full_bert=full_bert, seed=seed, device=device,
                             work=work, **overrides)

    def check_batch_inputs(self, batch: Batch, has_text_encoder: bool) -> None:
        """The checks every model makes before computing: ``batch`` is a ``Batch``, audio / vision are (B, L, D)
        with the configured ``audio_dim`` / ``vision_dim``, and precomputed text features are present when the
        model has no text encoder. Each failure is one error naming the field and what was expected."""
        if not isinstance(batch, Batch):
            raise TypeError(f"batch must be a msa_fast Batch, got {type(batch).__name__}")
        c = self.config
        for name, x, dim in (("audio", batch.audio, c["audio_dim"]), ("vision", batch.vision, c["vision_dim"])):
            if x.dim() != 3 or x.shape[-1] != dim:
                raise ValueError(f"batch.{name} must be (B, L, {dim}), got {tuple(x.shape)}")
        if not has_text_encoder and batch.text_features is None:
            raise ValueError("use_text_features=True but batch.text_features is None (the pickle has no 'text' "
                             "key: set use_text_features=false to run BERT on text_bert)")

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        raise TypeError(f"{type(self).__name__} has no official state_dict mapping")

    def load_state_dict_checked(self, state_dict: Mapping[str, Tensor], what: str) -> None:
        """``load_state_dict(strict=True)`` that first reports every missing key, unexpected key and shape mismatch
        in one ValueError (``what`` names the source, e.g. "official LNLN state_dict")."""
        sd = dict(state_dict)
        own = self.state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = sorted(f"{k}: expected {tuple(own[k].shape)}, got {tuple(sd[k].shape)}"
                        for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
        if missing or unexpected or shapes:
            parts = [f"{label} ({len(items)}): {items[:20]}{' …' if len(items) > 20 else ''}"
                     for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                          ("shape mismatches", shapes)) if items]
            raise ValueError(f"{what} does not fit this configuration; " + "; ".join(parts))
        self.load_state_dict(sd, strict=True)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def no_decay_param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                          official_name: Callable[[str], str] = lambda name: name) -> list[dict[str, Any]]:
    """The optimizer groups of the BERT-era recipe the official training scripts share (``transformers`` AdamW): no
    weight decay where the parameter's *official* name contains ``bias`` or ``LayerNorm.weight`` (all biases, BERT's
    LayerNorm weights), ``weight_decay`` elsewhere. ``official_name`` maps our parameter name to the official one
    where the two differ."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        off = official_name(name)
        (no_decay if ("bias" in off or "LayerNorm.weight" in off) else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
