"""MIDG building blocks (reconstruction, not the authors' code): the Cross-Modal Adapter, the frozen text encoder
it is inserted into, per-domain input projections and the Mixture of Invariant Experts.

Shapes: B batch, L_t / L_a / L_v token counts, d model width, d_text text-encoder width, r adapter width,
E experts, h expert hidden width, N valid tokens of a batch.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn.attention import MultiSourceAttention
from ...ops import masked_mean

ROUTINGS = ("dense", "topk")
ROUTER_CONTEXTS = ("cross_modal", "token")


class CrossModalAdapter(nn.Module):
    """CMA: h + gate · up(MultiSourceAttention(down(LN(h)) → audio / vision tokens)).

    text (B, L_t, d_text), sources [(tokens (B, L_m, d), key_padding_mask (B, L_m) True = padding)], text padding
    (B, L_t) → (B, L_t, d_text). One softmax per source modality (``multi_source_attention``: one launch), keys /
    values projected d → r. The scalar gate starts at 0, so training starts from the frozen encoder's function.
    """

    def __init__(self, d_text: int, d_source: int, r: int, heads: int, num_sources: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(d_text)
        self.down = nn.Linear(d_text, r)
        self.cross = MultiSourceAttention(r, heads, num_sources, source_dims=[d_source] * num_sources, bias=True)
        self.up = nn.Linear(r, d_text)
        self.dropout = nn.Dropout(dropout)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, text: Tensor, sources: Sequence[tuple[Tensor, Optional[Tensor]]],
                text_padding_mask: Optional[Tensor] = None) -> Tensor:
        q = self.down(self.norm(text))
        ctx = self.cross(q, list(sources), query_padding_mask=text_padding_mask)
        return text + self.gate * self.dropout(self.up(ctx))


class AdaptedTextEncoder(nn.Module):
    """A (frozen by default) HF ``BertModel`` with one ``CrossModalAdapter`` after each of its layers.

    The adapters are forward hooks on ``encoder.layer[i]``, so BERT runs its own code (masks, attention
    implementation) unchanged; the audio / vision context of the current forward is held only inside ``forward``.
    ids / attention_mask / segment_ids (B, L_t) int, sources as ``CrossModalAdapter`` → (B, L_t, d_text).
    A frozen encoder stays in eval mode (no dropout: its features are a fixed function, as the spec's frozen
    encoder) and its parameters have ``requires_grad=False``.
    """

    def __init__(self, bert: nn.Module, adapters: nn.ModuleList, frozen: bool = True):
        super().__init__()
        self.bert = bert
        self.adapters = adapters
        self.frozen = frozen
        layers = bert.encoder.layer
        if len(layers) != len(adapters):
            raise ValueError(f"{len(adapters)} adapters for a text encoder with {len(layers)} layers")
        if frozen:
            for p in bert.parameters():
                p.requires_grad_(False)
        self._context: Optional[tuple[list, Optional[Tensor]]] = None
        for layer, adapter in zip(layers, adapters):
            layer.register_forward_hook(self._hook(adapter))

    def _hook(self, adapter: CrossModalAdapter):
        def hook(module: nn.Module, args, output):
            if self._context is None:  # BERT called outside forward (e.g. by a user): plain BERT
                return output
            sources, text_pad = self._context
            if isinstance(output, tuple):  # older transformers return (hidden, ...)
                return (adapter(output[0], sources, text_pad), *output[1:])
            return adapter(output, sources, text_pad)

        return hook

    @contextlib.contextmanager
    def _with_context(self, sources, text_pad) -> Iterator[None]:
        self._context = (list(sources), text_pad)
        try:
            yield
        finally:
            self._context = None

    def train(self, mode: bool = True) -> "AdaptedTextEncoder":
        super().train(mode)
        if self.frozen:
            self.bert.eval()
        return self

    def forward(self, ids: Tensor, attention_mask: Tensor, segment_ids: Tensor,
                sources: Sequence[tuple[Tensor, Optional[Tensor]]]) -> Tensor:
        with self._with_context(sources, attention_mask == 0):
            return self.bert(input_ids=ids, attention_mask=attention_mask, token_type_ids=segment_ids)[0]


class DomainProjection(nn.Module):
    """Per-domain ``Linear(in_dim → d)`` selected by each sample's domain id.

    x (B, L, in_dim), domain (B,) int64 or None (= domain 0) → (B, L, d). ``num_domains`` learned maps (one per
    *source* domain); a sample whose id is ``>= num_domains`` (or negative) comes from a domain never seen in
    training and is projected with the mean of the source maps (for linear maps = the average of their outputs): the
    only map that needs no target data (strict DG). With ``shared=True`` a single map serves every domain.
    """

    def __init__(self, in_dim: int, d: int, num_domains: int = 1, shared: bool = False):
        super().__init__()
        n = 1 if shared else max(1, int(num_domains))
        self.weight = nn.Parameter(torch.empty(n, in_dim, d))
        self.bias = nn.Parameter(torch.empty(n, d))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default init, per domain
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, domain: Optional[Tensor]) -> Tensor:
        if self.weight.shape[0] == 1 or domain is None:  # one map, or a batch without domain ids (= domain 0)
            return x @ self.weight[0] + self.bias[0]
        return self._mixed(x, domain)

    def _mixed(self, x: Tensor, domain: Tensor) -> Tensor:
        n = self.weight.shape[0]
        # (n + 1) maps: the source maps and their mean for unseen domains; one batched matmul per sample's map
        weights = torch.cat([self.weight, self.weight.mean(0, keepdim=True)])
        biases = torch.cat([self.bias, self.bias.mean(0, keepdim=True)])
        seen = (domain >= 0) & (domain < n)
        idx = torch.where(seen, domain, torch.full_like(domain, n))
        return torch.baddbmm(biases[idx].unsqueeze(1), x, weights[idx])


def modality_mean(tokens: Tensor, padding_masks: Sequence[Tensor], spans: Sequence[int]) -> Tensor:
    """Mean over modalities of each modality's masked token mean: tokens (B, ΣL_m, d), padding masks (B, L_m)
    (True = padding), spans [L_m] → (B, d). Each modality weighs the same, whatever its frame count (500 vision
    frames must not drown 20 text tokens); a fully missing modality contributes zeros."""
    parts = torch.split(tokens, list(spans), dim=1)
    return torch.stack([masked_mean(p, key_padding_mask=m) for p, m in zip(parts, padding_masks)]).mean(0)


class MixtureOfInvariantExperts(nn.Module):
    """MoIE layer: x + Σ_e g_e(x, c) · FFN_e(LN(x)) over the valid tokens, FFN_e = Linear d → h, GELU, Linear h → d.

    The experts run through the fused ``msa_fast.ops.expert_mixture`` (dense soft mixture: every expert on every
    token, one grouped GEMM) or ``expert_mixture_topk`` (each token to its k best experts). The router is per token,
    ``Linear([LN(x); c] → E)`` where c (B, d) is the cross-modal summary (mean of the modalities' token means) —
    routing sees joint context, the spec's "inter-modal synergy" — or ``Linear(LN(x) → E)`` with
    ``router_context="token"``.

    tokens (B, L, d), padding (B, L) True = padding, summary (B, d) → (tokens (B, L, d), aux) with aux =
    {"gates": (N, E) router probabilities of the valid tokens, "load_balance": scalar (top-k: Switch-style
    E·Σ_e f_e·P_e, 1 when balanced; dense: 0)}. Padding tokens are passed through unchanged and never routed.
    """

    def __init__(self, d: int, num_experts: int, hidden: int, routing: str = "dense", top_k: int = 2,
                 router_context: str = "cross_modal", activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if router_context not in ROUTER_CONTEXTS:
            raise ValueError(f"router_context must be one of {ROUTER_CONTEXTS}, got {router_context!r}")
        if routing == "topk" and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k}")
        self.routing, self.top_k, self.router_context, self.activation = routing, top_k, router_context, activation
        self.norm = nn.LayerNorm(d)
        self.router = nn.Linear(2 * d if router_context == "cross_modal" else d, num_experts)
        self.w1 = nn.Parameter(torch.empty(num_experts, d, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, d))
        self.b2 = nn.Parameter(torch.empty(num_experts, d))
        for w, b, fan_in in ((self.w1, self.b1, d), (self.w2, self.b2, hidden)):  # nn.Linear's init per expert
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)
        self.dropout = nn.Dropout(dropout)

    @property
    def num_experts(self) -> int:
        return self.w1.shape[0]

    def forward(self, tokens: Tensor, padding: Tensor, summary: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        from ...ops.expert_mixture import expert_mixture, expert_mixture_topk

        valid = ~padding
        x = self.norm(tokens[valid])  # (N, d): only real tokens are routed and computed
        if self.router_context == "cross_modal":
            rows = valid.nonzero()[:, 0]
            logits = self.router(torch.cat([x, summary[rows]], dim=-1))
        else:
            logits = self.router(x)
        probs = logits.softmax(dim=-1)  # (N, E)
        if self.routing == "dense":
            y = expert_mixture(x, probs, self.w1, self.b1, self.w2, self.b2, activation=self.activation)
            balance = probs.new_zeros(())
        else:
            weight, idx = probs.topk(self.top_k, dim=-1)
            weight = weight / weight.sum(-1, keepdim=True)  # the k chosen gates sum to 1
            y = expert_mixture_topk(x, idx, weight, self.w1, self.b1, self.w2, self.b2, activation=self.activation)
            balance = load_balance_loss(probs, idx)
        out = tokens.masked_scatter(valid.unsqueeze(-1), (tokens[valid] + self.dropout(y)).to(tokens.dtype))
        return out, {"gates": probs, "load_balance": balance}


def load_balance_loss(probs: Tensor, expert_idx: Tensor) -> Tensor:
    """Switch-Transformer auxiliary loss E · Σ_e f_e · P_e: probs (N, E) router probabilities, expert_idx (N, k)
    chosen experts; f_e = share of the N·k assignments that went to e, P_e = mean router probability of e. Equals 1
    for a uniform router and grows as routing collapses onto few experts (f is not differentiable; P carries the
    gradient)."""
    n, e = probs.shape
    if n == 0:
        return probs.new_zeros(())
    counts = torch.zeros(e, dtype=probs.dtype, device=probs.device).index_add_(
        0, expert_idx.reshape(-1), torch.ones(expert_idx.numel(), dtype=probs.dtype, device=probs.device))
    return e * (counts / expert_idx.numel() * probs.mean(0)).sum()


def domain_classifier(d: int, hidden: int, num_domains: int) -> nn.Sequential:
    """MLP d → hidden → num_domains on the (gradient-reversed) pooled expert output."""
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, max(1, num_domains)))


def task_loss(pred: Tensor, target: Tensor, kind: str, reduction: str = "mean") -> Tensor:
    """L1 or MSE regression loss."""
    if kind == "l1":
        return F.l1_loss(pred, target, reduction=reduction)
    return F.mse_loss(pred, target, reduction=reduction)
