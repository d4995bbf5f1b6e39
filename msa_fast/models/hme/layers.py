"""HME building blocks, with the official module / parameter names (``YetZzzzzz/HME``, ``HME_MSA/model_utils.py`` and
``HME_MSA/modules/*.py``) so an official ``state_dict`` loads key for key.

Shapes: B batch, L sequence length, d model width (``d_l``), H heads, Dh = d / H head width, K VIB code width (= d).
Everything is batch-first here; the official MulT encoder is time-first (HME exposes ``mult_*`` transposed back).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...nn.attention import merge_heads, split_heads
from ...nn.dropout import Dropout
from ...ops import attention
from ...ops import dropout as fused_dropout


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """The fused dropout op (counter RNG; ``F.dropout`` on the torch backend), skipping the RNG entirely when it is
    a no-op (p = 0 or eval)."""
    return fused_dropout(x, p, True) if training and p > 0 else x


# ------------------------------------------------------------------------------------------------------------------
# MulT (fairseq-style) encoder, called by HME as enc(x, x, x)
# ------------------------------------------------------------------------------------------------------------------
class SinusoidalPositions(nn.Module):
    """fairseq sinusoidal positions keyed on a (B, L) "token" tensor: position t + 1 where the token is non-zero,
    0 (a zero embedding) where it is zero. HME passes feature channel 0 of the projected input, so zero rows (and a
    zeroed modality) get no position at all (quirk kept)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        # Official buffer (uninitialised memory used only for its dtype); kept for state_dict compatibility.
        self.register_buffer("_float_tensor", torch.zeros(1))

    def table(self, num: int, device: torch.device) -> Tensor:
        """(num, dim) float32 table, row 0 zero (tensor2tensor layout: sin half then cos half)."""
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freq = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * -step)
        angles = torch.arange(num, dtype=torch.float32, device=device)[:, None] * freq[None, :]
        emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        if self.dim % 2 == 1:
            emb = torch.cat([emb, emb.new_zeros(num, 1)], dim=1)
        emb[0] = 0.0
        return emb

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, L) → (B, L, dim) embeddings in ``tokens``' dtype (no gradient, as the official ``.detach()``)."""
        b, n = tokens.shape
        positions = torch.arange(1, n + 1, device=tokens.device).expand(b, n)
        positions = torch.where(tokens != 0, positions, torch.zeros_like(positions))
        return self.table(n + 1, tokens.device).to(tokens.dtype)[positions]


class PackedMultiheadAttention(nn.Module):
    """fairseq ``MultiheadAttention``: packed ``in_proj_weight`` (3d, d) + ``in_proj_bias``, ``out_proj``."""

    def __init__(self, dim: int, heads: int, attn_dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_l ({dim}) must be divisible by num_heads ({heads})")
        self.dim, self.heads, self.attn_dropout = dim, heads, attn_dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (B, Lq, d), k / v (B, Lk, d) → (B, Lq, d). No mask: padded positions are attended (official)."""
        d, w, b = self.dim, self.in_proj_weight, self.in_proj_bias
        qp = F.linear(q, w[:d], b[:d])
        if k is v:  # one GEMM for K and V when they are the same tensor (eval mode)
            kp, vp = F.linear(k, w[d:], b[d:]).chunk(2, dim=-1)
        else:
            kp, vp = F.linear(k, w[d:2 * d], b[d:2 * d]), F.linear(v, w[2 * d:], b[2 * d:])
        p = self.attn_dropout if self.training else 0.0
        out = attention(split_heads(qp, self.heads), split_heads(kp, self.heads), split_heads(vp, self.heads),
                        scale=(d // self.heads) ** -0.5, dropout_p=p)
        return self.out_proj(merge_heads(out))


class MulTLayer(nn.Module):
    """Pre-LN fairseq encoder layer; the same ``layer_norms[0]`` normalises the query and the key / value streams."""

    def __init__(self, dim: int, heads: int, attn_dropout: float, relu_dropout: float, res_dropout: float):
        super().__init__()
        self.self_attn = PackedMultiheadAttention(dim, heads, attn_dropout)
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])

    def forward(self, x: Tensor, x_k: Tensor, x_v: Tensor) -> Tensor:
        ln = self.layer_norms[0]
        q = ln(x)
        k = q if x_k is x else ln(x_k)
        v = k if x_v is x_k else ln(x_v)
        x = x + dropout(self.self_attn(q, k, v), self.res_dropout, self.training)
        h = dropout(F.relu(self.fc1(self.layer_norms[1](x))), self.relu_dropout, self.training)
        return x + dropout(self.fc2(h), self.res_dropout, self.training)


class MulTEncoder(nn.Module):
    """MulT ``TransformerEncoder`` as HME calls it, ``enc(x, x, x)``.

    x_in (B, L, d) → (B, L, d): x0 = √d·x_in + positions(x_in[..., 0]); embedding dropout drawn separately for the
    query, key and value copies; every layer attends from the running query stream to the *embedded input* keys /
    values (the official loop never updates x_k / x_v); final LayerNorm.
    """

    def __init__(self, dim: int, heads: int, layers: int, attn_dropout: float, relu_dropout: float,
                 res_dropout: float, embed_dropout: float):
        super().__init__()
        self.embed_scale = math.sqrt(dim)
        self.embed_dropout = embed_dropout
        self.embed_positions = SinusoidalPositions(dim)
        self.layers = nn.ModuleList(
            MulTLayer(dim, heads, attn_dropout, relu_dropout, res_dropout) for _ in range(layers))
        self.register_buffer("version", torch.tensor([2.0]))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x_in: Tensor) -> Tensor:
        x0 = self.embed_scale * x_in + self.embed_positions(x_in[..., 0])
        if self.training and self.embed_dropout > 0:
            x, x_k, x_v = (dropout(x0, self.embed_dropout, True) for _ in range(3))
        else:
            x = x_k = x_v = x0
        for layer in self.layers:
            x = layer(x, x_k, x_v)
        return self.layer_norm(x)


# ------------------------------------------------------------------------------------------------------------------
# Perceiver-style blocks (latent enhancement, hyper-modality generation)
# ------------------------------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """lucidrains-style attention: ``to_q`` / ``to_kv`` without bias, ``to_out`` with bias; no dropout, no mask.

    With a single context token the softmax is exactly 1, so the output is ``to_out(V)``: ``single_token_shortcut``
    skips the dead Q / K projections and the score computation (same numbers, tested).
    """

    single_token_shortcut: bool = True

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.inner, self.scale = heads, inner, dim_head ** -0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        """x (B, Lq, d), context (B, Lk, d_ctx) (default x) → (B, Lq, d)."""
        context = x if context is None else context
        if self.single_token_shortcut and context.shape[1] == 1:
            v = F.linear(context, self.to_kv.weight[self.inner:])  # (B, 1, inner)
            return self.to_out(v.expand(-1, x.shape[1], -1))
        k, v = self.to_kv(context).chunk(2, dim=-1)
        out = attention(split_heads(self.to_q(x), self.heads), split_heads(k, self.heads),
                        split_heads(v, self.heads), scale=self.scale)
        return self.to_out(merge_heads(out))


class GEGLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        x, gates = x.chunk(2, dim=-1)
        return x * F.gelu(gates)


class FeedForward(nn.Module):
    """Linear d → 2·mult·d, GEGLU, Linear mult·d → d (official ``net`` indices 0 / 2; dropout 0)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult * 2), GEGLU(), nn.Linear(dim * mult, dim), Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """LayerNorm on the input (and on the context when ``context_dim`` is given) before ``fn``."""

    def __init__(self, dim: int, fn: nn.Module, context_dim: Optional[int] = None):
        super().__init__()
        self.fn = fn
        self.norm = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(context_dim) if context_dim is not None else None

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        x = self.norm(x)
        if self.norm_context is not None:
            return self.fn(x, context=self.norm_context(context))
        return self.fn(x)


class TokenMean(nn.Module):
    """(B, N, d) → (B, d) mean over tokens (the official einops ``Reduce('b n d -> b d', 'mean')``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def _cross_block(dim: int, heads: int, dim_head: int) -> nn.ModuleList:
    return nn.ModuleList([PreNorm(dim, CrossAttention(dim, dim, heads, dim_head), context_dim=dim),
                          PreNorm(dim, FeedForward(dim))])


class LatentTransformer(nn.Module):
    """Perceiver enhancement: ``num_latents`` learned latents (randn) cross-attend to the data, then one latent
    self-attention + FF per layer; output mean over latents → LayerNorm.

    data (B, N, d) → (B, d).
    """

    def __init__(self, num_latents: int, dim: int, depth: int, heads: int, dim_head: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList()
        for _ in range(depth):
            block = _cross_block(dim, heads, dim_head)
            block.append(nn.ModuleList([nn.ModuleList([PreNorm(dim, CrossAttention(dim, dim, heads, dim_head)),
                                                       PreNorm(dim, FeedForward(dim))])]))
            self.layers.append(block)
        self.to_embedds = nn.Sequential(TokenMean(), nn.LayerNorm(dim))

    def forward(self, data: Tensor) -> Tensor:
        x = self.latents.to(data.dtype).expand(data.shape[0], -1, -1)
        for cross_attn, cross_ff, self_blocks in self.layers:
            x = cross_attn(x, context=data) + x
            x = cross_ff(x) + x
            for self_attn, self_ff in self_blocks:
                x = self_attn(x) + x
                x = self_ff(x) + x
        return self.to_embedds(x)


class HyperEncoder(nn.Module):
    """The official ``Encoder_Layer``: per layer x = CA(LN x, LN ctx) + x; x = FF(LN x) + x; then token mean → LN.

    query (B, Nq, d), context (B, Nc, d) → (B, d).
    """

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int):
        super().__init__()
        self.layers = nn.ModuleList(_cross_block(dim, heads, dim_head) for _ in range(depth))
        self.to_embedds = nn.Sequential(TokenMean(), nn.LayerNorm(dim))

    def forward(self, query: Tensor, context: Tensor) -> Tensor:
        x = query
        for cross_attn, cross_ff in self.layers:
            x = cross_attn(x, context=context) + x
            x = cross_ff(x) + x
        return self.to_embedds(x)


# ------------------------------------------------------------------------------------------------------------------
# VIB and uncertainty-aware gates
# ------------------------------------------------------------------------------------------------------------------
class VIBEstimate(nn.Module):
    """Variational information bottleneck: x (B, d) → μ, σ = softplus(raw − 5) (B, K), code F = μ + ε·σ (or μ),
    logits = Linear(F) (B, out), KL = 0.5·mean(μ² + σ² − 2 log σ − 1)."""

    def __init__(self, dim: int, code_dim: int, output_dim: int = 1):
        super().__init__()
        self.K = code_dim
        self.encode = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(True), nn.Linear(2 * dim, 2 * dim),
                                    nn.ReLU(True), nn.Linear(2 * dim, 2 * code_dim))
        self.decode = nn.Sequential(nn.Linear(code_dim, output_dim))

    def forward(self, x: Tensor, sample: bool) -> dict[str, Tensor]:
        stats = self.encode(x)
        mu = stats[:, : self.K]
        std = F.softplus(stats[:, self.K:] - 5)
        code = mu + torch.randn_like(std) * std if sample else mu
        kl = 0.5 * torch.mean(mu.pow(2) + std.pow(2) - 2 * std.log() - 1)
        return {"mu": mu, "std": std, "encoding": code, "logits": self.decode(code), "kl": kl}


class _GateMLP(nn.Module):
    """The official ``attention_mlp`` Sequential (Linear → Dropout → ReLU) + ``fc_att``."""

    def __init__(self, in_dim: int, hidden: int, n_out: int, dropout: float):
        super().__init__()
        self.attention_mlp = nn.Sequential()
        self.attention_mlp.add_module("attention_mlp", nn.Linear(in_dim, hidden))
        self.attention_mlp.add_module("attention_mlp_dropout", Dropout(dropout))
        self.attention_mlp.add_module("attention_mlp_activation", nn.ReLU())
        self.fc_att = nn.Linear(hidden, n_out)

    def logits(self, feats: list[Tensor]) -> Tensor:
        return self.fc_att(self.attention_mlp(torch.cat(feats, dim=1)))


class UncertaintyGate2(_GateMLP):
    """``Attention_Uncertainty_2``: S = a0·h + a1·f with a = softmax(d^-½ · MLP(h, f) ⊙ [1, clamp(1/(mean σ + 1e-8),
    LB, UB)]). h, f, σ (B, d) → (B, d)."""

    def __init__(self, dim: int, hidden: int, lower: float, upper: float, dropout: float = 0.3):
        super().__init__(2 * dim, hidden, 2, dropout)
        self.scale, self.lower, self.upper = dim ** -0.5, lower, upper

    def forward(self, h: Tensor, f: Tensor, std: Tensor) -> Tensor:
        w = torch.clamp(1.0 / (std.mean(dim=1) + 1e-8), min=self.lower, max=self.upper)
        a = self.logits([h, f]) * torch.stack([torch.ones_like(w), w], dim=1)
        a = torch.softmax(a * self.scale, dim=1)
        return a[:, :1] * h + a[:, 1:] * f


class UncertaintyGate3(_GateMLP):
    """``Attention_Uncertainty_3``: S_H = Σ_m a_m·f_m, a = softmax(d^-½ · MLP(f_l, f_a, f_v) ⊙ softmax_m(1/(mean σ_m
    + 1e-8))). Three (B, d) codes and their σ → (B, d)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.3):
        super().__init__(3 * dim, hidden, 3, dropout)
        self.scale = dim ** -0.5

    def forward(self, feats: list[Tensor], stds: list[Tensor]) -> Tensor:
        certainty = torch.softmax(torch.stack([1.0 / (s.mean(dim=1) + 1e-8) for s in stds], dim=1), dim=1)
        a = torch.softmax(self.logits(feats) * certainty * self.scale, dim=1)
        return (torch.stack(feats, dim=1) * a[..., None]).sum(dim=1)
