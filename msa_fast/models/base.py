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

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        raise TypeError(f"{type(self).__name__} has no official state_dict mapping")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
