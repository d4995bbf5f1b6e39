"""Attention layers on top of the fused ops (projections + op), batch-first (B, L, E).

Parameter mapping from the official modules:
- ``nn.MultiheadAttention(E, H, batch_first=True)`` cross-attention (MulT/MISA/DashFusion style ``mha(q, k, v,
  key_padding_mask=...)``): ``in_proj_weight[:E] / [E:2E] / [2E:]`` → ``q_proj / k_proj / v_proj`` weights (same
  for ``in_proj_bias``), or ``q_proj_weight / k_proj_weight / v_proj_weight`` when kdim/vdim differ;
  ``out_proj`` → ``out_proj``; ``dropout`` → ``dropout``. ``CrossModalAttention.from_multihead_attention(mha)`` copies
  them; the output equals ``mha(...)[0]`` (attention weights are never materialised, so none are returned).
- einops-style ``to_q / to_k / to_v / to_out`` attention (ALMT/LNLN ``CrossAttention``): ``to_q`` → ``q_proj``,
  ``to_k`` → ``k_proj``, ``to_v`` → ``v_proj``, ``to_out[0]`` → ``out_proj`` (``bias=False`` for q/k/v).
- LNLN ``HhyperLearningLayer`` / DashFusion ``Multi_CA``: ``to_q`` → ``MultiSourceAttention.q_proj``;
  ``to_k_ta, to_k_tv`` (or ``to_k[m]``) → ``k_projs[s]``; ``to_v_*`` → ``v_projs[s]``; ``to_out`` → ``out_proj``
  (``out_proj=False`` for Multi_CA, which has none).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import attention, multi_source_attention


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, L, H·D) → (B, H, L, D) (a view; the ops accept strided inputs)."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, L, D) → (B, L, H·D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _check_embed(embed_dim: int, num_heads: int) -> int:
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    return embed_dim // num_heads


class CrossModalAttention(nn.Module):
    """Cross-attention with key padding: out = out_proj(attention(q_proj(query), k_proj(key), v_proj(value))).

    query (B, Lq, E), key (B, Lk, kdim), value (B, Lk, vdim), key_padding_mask (B, Lk) bool True = padding,
    query_padding_mask (B, Lq) → (B, Lq, E). Rows without a valid key give out_proj's bias (zero attention).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, out_proj: bool = True,
                 scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_embed(embed_dim, num_heads)
        self.embed_dim, self.num_heads, self.dropout, self.scale, self.backend = (
            embed_dim, num_heads, float(dropout), scale, backend)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias) if out_proj else nn.Identity()

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, backend: str = "auto") -> "CrossModalAttention":
        """Copy an ``nn.MultiheadAttention``'s weights (see the module docstring for the mapping)."""
        E = mha.embed_dim
        layer = cls(E, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None, kdim=mha.kdim,
                    vdim=mha.vdim, backend=backend)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.split(E)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, w in ((layer.q_proj, wq), (layer.k_proj, wk), (layer.v_proj, wv)):
                lin.weight.copy_(w)
            if mha.in_proj_bias is not None:
                for lin, b in zip((layer.q_proj, layer.k_proj, layer.v_proj), mha.in_proj_bias.split(E)):
                    lin.bias.copy_(b)
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype)

    def forward(self, query: Tensor, key: Tensor, value: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, query_padding_mask: Optional[Tensor] = None) -> Tensor:
        value = key if value is None else value
        h = self.num_heads
        out = attention(split_heads(self.q_proj(query), h), split_heads(self.k_proj(key), h),
                        split_heads(self.v_proj(value), h), key_padding_mask=key_padding_mask,
                        query_padding_mask=query_padding_mask, scale=self.scale,
                        dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out_proj(merge_heads(out))


class MultiSourceAttention(nn.Module):
    """One query stream over S sources with a separate softmax per source, summed (LNLN hyper-modality layer,
    DashFusion Multi_CA / temporal alignment).

    out = out_proj(Σ_s softmax_s(q_proj(query)·k_proj_s(x_s)ᵀ·scale)·v_proj_s(x_s)).
    query (B, Lq, E); sources = [(x_s (B, L_s, source_dims[s]), key_padding_mask_s (B, L_s) | None)]
    → (B, Lq, E).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_sources: int,
                 source_dims: Optional[Sequence[int]] = None, bias: bool = False, out_proj: bool = True,
                 scale: Optional[float] = None, backend: str = "auto"):
        super().__init__()
        self.head_dim = _check_embed(embed_dim, num_heads)
        dims = list(source_dims) if source_dims is not None else [embed_dim] * num_sources
        if len(dims) != num_sources:
            raise ValueError(f"source_dims must have num_sources={num_sources} entries, got {len(dims)}")
        self.num_heads, self.scale, self.backend = num_heads, scale, backend
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_projs = nn.ModuleList(nn.Linear(d, embed_dim, bias=bias) for d in dims)
        self.v_projs = nn.ModuleList(nn.Linear(d, embed_dim, bias=bias) for d in dims)
        self.out_proj = nn.Linear(embed_dim, embed_dim) if out_proj else nn.Identity()

    def forward(self, query: Tensor, sources: Sequence[tuple[Tensor, Optional[Tensor]]],
                query_padding_mask: Optional[Tensor] = None) -> Tensor:
        if len(sources) != len(self.k_projs):
            raise ValueError(f"sources must have {len(self.k_projs)} entries, got {len(sources)}")
        h = self.num_heads
        srcs = [(split_heads(kp(x), h), split_heads(vp(x), h), m)
                for kp, vp, (x, m) in zip(self.k_projs, self.v_projs, sources)]
        out = multi_source_attention(split_heads(self.q_proj(query), h), srcs, scale=self.scale,
                                     query_padding_mask=query_padding_mask, backend=self.backend)
        return self.out_proj(merge_heads(out))
