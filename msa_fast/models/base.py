"""The interface every drop-in model implements (what the trainer and CLI rely on)."""
from __future__ import annotations

import abc
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from ..data.batch import Batch


class MSAModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class: ``forward(batch) -> {"M": (B,) prediction, ...intermediates}``.

    Subclasses implement ``forward`` and ``loss``; override ``training_step`` when the objective needs more than
    one forward (DashFusion's partners, LNLN's complete view), ``prepare_epoch`` for per-epoch work outside the
    step (partner retrieval, memory-bank refresh) and ``load_official_state_dict`` for parity with the official code.
    """

    model_name: str = ""
    CONFIGS: dict[str, dict[str, Any]] = {}

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
