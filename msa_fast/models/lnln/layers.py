"""LNLN / ALMT building blocks: pre-LN encoders with separate q/k/v LayerNorms, token compressors, the
cross transformer, the hyper-modality layer and gradient reversal.

Shapes: B batch, L tokens, d model width (128 officially), H heads, D head dim.

Module and attribute names (``layers.{i}.0.norm_q``, ``fn.to_q``, ``net.3``, ``extra_token``,
``CrossTransformerEncoder`` …) follow the official ``models/basic_layers.py`` so an official ``state_dict`` loads
without a key map. Quirks kept on purpose (method_lnln.md §8a):

- attention inner width = heads · dim_head = 8 · 64 = 512 although d = 128 (dim_head is never overridden);
- q, k and v get *separate* LayerNorms even in self-attention (x is normalised three times);
- no final LayerNorm, no key-padding mask anywhere (padded frames / tokens are attended);
- the hyper layer returns ``LN4(h_hyper) + shift`` (norm4 is applied before the add: not a true residual).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ...ops import attention, multi_source_attention
from ...nn.attention import merge_heads, split_heads


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.neg() * ctx.alpha, None


def grad_reverse(x: Tensor, alpha: float = 1.0) -> Tensor:
    """Identity forward; the backward multiplies the incoming gradient by −alpha."""
    return _GradientReversal.apply(x, alpha)


class GradientReversalLayer(nn.Module):
    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.alpha)


def feed_forward(dim: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear → GELU → Dropout → Linear → Dropout (the Linears sit at indices 0 and 3, as the official ``net``)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = feed_forward(dim, hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class QKVAttention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections d → H·D and ``to_out`` = [Linear(H·D → d)].

    q (B, Lq, d), k/v (B, Lk, d) → (B, Lq, d). No mask (official); scale D^-½.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # index 0, as the official Sequential(Linear, Dropout(0))

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        h = self.heads
        out = attention(split_heads(self.to_q(q), h), split_heads(self.to_k(k), h), split_heads(self.to_v(v), h),
                        scale=self.scale)
        return self.to_out(merge_heads(out))


class PreNormQKV(nn.Module):
    """``fn(norm_q(q), norm_k(k), norm_v(v))`` (three LayerNorms even when q = k = v)."""

    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.fn(self.norm_q(q), self.norm_k(k), self.norm_v(v))


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x))


def _encoder_layers(dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> nn.ModuleList:
    return nn.ModuleList(
        nn.ModuleList([PreNormQKV(dim, QKVAttention(dim, heads, dim_head)), PreNorm(dim, FeedForward(dim, mlp_dim))])
        for _ in range(depth)
    )


class TransformerEncoder(nn.Module):
    """Pre-LN self-attention encoder without final LN: per layer ``x += attn(x, x, x); x += ff(x)``.

    (B, L, d) → (B, L, d), or with ``save_hidden`` the list [input, after layer 1, …] (depth + 1 tensors).
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.layers = _encoder_layers(dim, depth, heads, dim_head, mlp_dim)

    def forward(self, x: Tensor, save_hidden: bool = False, keep_rows: Optional[int] = None):
        """``keep_rows``: return only x[:, :keep_rows] (B, keep_rows, d) — the last layer then computes just those
        query rows (attention, LayerNorms and FFN are row-wise given the keys), the same numbers at a fraction of
        the cost for compressors whose callers keep the first tokens."""
        hidden = [x]
        last = len(self.layers) - 1
        for i, (attn, ff) in enumerate(self.layers):
            q = x[:, :keep_rows] if keep_rows is not None and i == last and not save_hidden else x
            x = attn(q, x, x) + q
            x = ff(x) + x
            hidden.append(x)
        if save_hidden:
            return hidden
        return x if keep_rows is None else x[:, :keep_rows]


class TokenTransformer(nn.Module):
    """ALMT token compressor (official ``Transformer``).

    With ``token_len``: prepend ``token_len`` learned tokens (zeros-init) to x (B, n, d), add the fixed-length
    randn position embedding sliced to n + token_len, encode → (B, token_len + n, d); callers keep the first
    ``token_len`` rows. Without: only the position embedding. ``n`` must not exceed ``num_frames``.
    ``tokens_only=True``: return just the summary tokens (B, token_len, d), computing only those rows in the last
    layer (exactly the official first rows; half the attention of a 2-layer compressor over 508 frames).
    """

    def __init__(self, num_frames: int, token_len: Optional[int], dim: int, depth: int, heads: int, mlp_dim: int,
                 dim_head: int = 64, save_hidden: bool = False, tokens_only: bool = False):
        super().__init__()
        if tokens_only and (not token_len or save_hidden):
            raise ValueError("tokens_only needs token_len and no save_hidden")
        self.num_frames, self.token_len, self.save_hidden = num_frames, token_len, save_hidden
        self.tokens_only = tokens_only
        extra = token_len or 0
        self.pos_embedding = nn.Parameter(torch.randn(1, num_frames + extra, dim))
        self.extra_token = nn.Parameter(torch.zeros(1, token_len, dim)) if token_len else None
        self.encoder = TransformerEncoder(dim, depth, heads, dim_head, mlp_dim)

    def forward(self, x: Tensor):
        b, n, _ = x.shape
        if n > self.num_frames:
            raise ValueError(f"input has {n} positions but this compressor was built for at most "
                             f"{self.num_frames} (its position embedding is fixed-length)")
        if self.extra_token is not None:
            x = torch.cat([self.extra_token.expand(b, -1, -1), x], dim=1)
        x = x + self.pos_embedding[:, : x.shape[1]]
        return self.encoder(x, self.save_hidden, keep_rows=self.token_len if self.tokens_only else None)


class CrossTransformerEncoder(nn.Module):
    """Per layer ``tgt += attn(q=tgt, k=v=src); tgt += ff(tgt)`` (separate LNs on tgt and src)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
        super().__init__()
        self.layers = _encoder_layers(dim, depth, heads, dim_head, mlp_dim)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        for attn, ff in self.layers:
            target = attn(target, source, source) + target
            target = ff(target) + target
        return target


class CrossTransformer(nn.Module):
    """One shared zeros token prepended to both streams, separate randn position embeddings.

    source (B, n_s, d), target (B, n_t, d) → (B, n_t + 1, d) (row 0 = the extra token).
    """

    def __init__(self, source_num_frames: int, tgt_num_frames: int, dim: int, depth: int, heads: int, mlp_dim: int,
                 dim_head: int = 64):
        super().__init__()
        self.pos_embedding_s = nn.Parameter(torch.randn(1, source_num_frames + 1, dim))
        self.pos_embedding_t = nn.Parameter(torch.randn(1, tgt_num_frames + 1, dim))
        self.extra_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.CrossTransformerEncoder = CrossTransformerEncoder(dim, depth, heads, dim_head, mlp_dim)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        tok = self.extra_token.expand(source.shape[0], -1, -1)
        source = torch.cat([tok, source], dim=1)
        source = source + self.pos_embedding_s[:, : source.shape[1]]
        target = torch.cat([tok, target], dim=1)
        target = target + self.pos_embedding_t[:, : target.shape[1]]
        return self.CrossTransformerEncoder(source, target)


class HyperModalityLayer(nn.Module):
    """Queries from the dominant stream attend audio and vision with **two independent softmaxes**, summed:

    shift = to_out(softmax(q k_aᵀ) v_a + softmax(q k_vᵀ) v_v); returns h_hyper + shift.
    All inputs (B, T, d) (already normalised by ``PreNormHyper``) → (B, T, d). Inner width H·D = d officially.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 16):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k_ta = nn.Linear(dim, inner, bias=False)
        self.to_k_tv = nn.Linear(dim, inner, bias=False)
        self.to_v_ta = nn.Linear(dim, inner, bias=False)
        self.to_v_tv = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, h_dominant: Tensor, h_a: Tensor, h_v: Tensor, h_hyper: Tensor) -> Tensor:
        h = self.heads
        sources = [(split_heads(self.to_k_ta(h_a), h), split_heads(self.to_v_ta(h_a), h), None),
                   (split_heads(self.to_k_tv(h_v), h), split_heads(self.to_v_tv(h_v), h), None)]
        out = multi_source_attention(split_heads(self.to_q(h_dominant), h), sources, scale=self.scale)
        return h_hyper + self.to_out(merge_heads(out))


class PreNormHyper(nn.Module):
    """norm1 (dominant), norm2 (audio), norm3 (vision), norm4 (h_hyper) before ``HyperModalityLayer``.

    Because h_hyper is normalised before the add, the update is ``h_hyper ← LN4(h_hyper) + shift`` (quirk).
    """

    def __init__(self, dim: int, fn: HyperModalityLayer):
        super().__init__()
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))
        self.fn = fn

    def forward(self, h_dominant: Tensor, h_a: Tensor, h_v: Tensor, h_hyper: Tensor) -> Tensor:
        return self.fn(self.norm1(h_dominant), self.norm2(h_a), self.norm3(h_v), self.norm4(h_hyper))


class HyperModalityEncoder(nn.Module):
    """Layer i reads the dominant representation ``h_dominant_list[i]``; audio/vision are the same every layer."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([PreNormHyper(dim, HyperModalityLayer(dim, heads, dim_head))]) for _ in range(depth))

    def forward(self, h_dominant_list: list[Tensor], h_a: Tensor, h_v: Tensor, h_hyper: Tensor) -> Tensor:
        if len(h_dominant_list) < len(self.layers):
            raise ValueError(f"h_dominant_list has {len(h_dominant_list)} entries, the encoder needs "
                             f"{len(self.layers)} (one per layer)")
        for i, (layer,) in enumerate(self.layers):
            h_hyper = layer(h_dominant_list[i], h_a, h_v, h_hyper)
        return h_hyper
