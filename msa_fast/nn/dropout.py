"""``Dropout``: drop-in ``nn.Dropout`` on the fused counter-RNG op (``msa_fast.ops.dropout``)."""
from __future__ import annotations

from torch import Tensor, nn

from ..ops.dropout import dropout


class Dropout(nn.Dropout):
    """An ``nn.Dropout`` (same constructor, no state, train/eval behaviour, ``isinstance`` checks) whose forward is the
    fused op; x (any shape) → same shape. ``backend`` as every fused op ("auto": C++ on CPU, Triton on CUDA, else
    ``F.dropout``). ``inplace`` is accepted for compatibility; the fused kernels write a new tensor."""

    def __init__(self, p: float = 0.5, inplace: bool = False, backend: str = "auto"):
        super().__init__(p, inplace)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training, backend=self.backend)
