"""``ExpertMixture``: E expert FFNs (d → h → d) mixed per token, on the fused op ``msa_fast.ops.expert_mixture``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.expert_mixture import ACTIVATIONS, expert_mixture, expert_mixture_topk


class ExpertMixture(nn.Module):
    """E expert FFNs ``act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]`` mixed by externally computed weights.

    Parameters: w1 (E, d, h), b1 (E, h), w2 (E, h, d), b2 (E, d); each expert initialised like a pair of
    ``nn.Linear`` layers (uniform ±1/√fan_in). Expert e's first layer ``nn.Linear(d, h)`` maps to
    ``w1[e] = linear.weight.T``, ``b1[e] = linear.bias`` (same for the second layer).

    ``forward(x, gates)``: x (..., d), gates (..., E) (e.g. a softmax router output) → (..., d), the dense mixture.
    ``forward(x, expert_idx=idx, expert_weight=w)``: idx (..., k) int64 in [0, E), w (..., k) → top-k routed mixture.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, activation: str = "gelu",
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if min(d_model, d_hidden, num_experts) < 1:
            raise ValueError(f"d_model, d_hidden and num_experts must be >= 1, got {d_model}, {d_hidden}, "
                             f"{num_experts}")
        fk = dict(device=device, dtype=dtype)
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.activation, self.backend = activation, backend
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_hidden, **fk))
        self.b1 = nn.Parameter(torch.empty(num_experts, d_hidden, **fk))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_hidden, d_model, **fk))
        self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **fk))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w, b, fan_in in ((self.w1, self.b1, self.d_model), (self.w2, self.b2, self.d_hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: Tensor, gates: Optional[Tensor] = None, *, expert_idx: Optional[Tensor] = None,
                expert_weight: Optional[Tensor] = None) -> Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dim d_model = {self.d_model}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.d_model)
        if gates is not None:
            if expert_idx is not None or expert_weight is not None:
                raise ValueError("pass either gates (dense mixture) or expert_idx + expert_weight (top-k), not both")
            if tuple(gates.shape) != (*lead, self.num_experts):
                raise ValueError(f"gates must have shape {(*lead, self.num_experts)} (x's leading dims, E), "
                                 f"got {tuple(gates.shape)}")
            out = expert_mixture(x2, gates.reshape(-1, self.num_experts), self.w1, self.b1, self.w2, self.b2,
                                 activation=self.activation, backend=self.backend)
        else:
            if expert_idx is None or expert_weight is None:
                raise ValueError("pass gates (..., E), or both expert_idx (..., k) and expert_weight (..., k)")
            if expert_idx.shape[:-1] != lead or expert_weight.shape[:-1] != lead:
                raise ValueError(f"expert_idx / expert_weight must have shape (*{tuple(lead)}, k), got "
                                 f"{tuple(expert_idx.shape)} / {tuple(expert_weight.shape)}")
            k = expert_idx.shape[-1]
            out = expert_mixture_topk(x2, expert_idx.reshape(-1, k), expert_weight.reshape(-1, k), self.w1,
                                      self.b1, self.w2, self.b2, activation=self.activation, backend=self.backend)
        return out.reshape(*lead, self.d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_hidden={self.d_hidden}, num_experts={self.num_experts}, "
                f"activation={self.activation!r}, backend={self.backend!r}")
