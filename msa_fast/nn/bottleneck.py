"""Bottleneck fusion (DashFusion HBF, MBT): K ≤ 16 bottleneck tokens exchange information with every modality.

One level (``BottleneckFusionLevel``):
1. gather:   b ← LN_g(b + MultiSourceAttention(b, [(x_m, pad_m)]))        (one softmax per modality)
2. exchange: for every modality at once (``bottleneck_exchange``):
             norm="sublayer" (DashFusion HBF): x_m ← x_m + LN_m(attn_m)   (LN on the sub-layer output, then residual)
             norm="post":                       x_m ← LN_m(x_m + attn_m)
             norm="none":                       x_m ← x_m + attn_m
   attn_m = out_m(softmax(q_m(x_m)·k_m(b)ᵀ·scale)·v_m(b)); ``scale`` overrides D^-½ (DashFusion uses (E/H)^-½).
3. optional feed-forward per modality: x_m ← x_m + LN(FFN(x_m)) (DashFusion ``ffn`` / ``ffn_norm``).
``BottleneckFusion`` stacks ``depth`` levels, keeping K, K/2, K/4, … bottleneck tokens (HBF's halving).

Parameter mapping from DashFusion's HBF (official ``CrossEncoder`` per modality, ``Multi_CA``): ``to_query`` →
``exchange_q[m]``, ``to_key`` / ``to_value`` → ``exchange_k[m]`` / ``exchange_v[m]``, ``attn_norm`` → ``exchange_norm[m]``,
``ffn`` / ``ffn_norm`` → ``ffn[m]`` / ``ffn_norm[m]``; ``Multi_CA.to_q / to_k[m] / to_v[m] / norm1`` → ``gather.q_proj /
gather.k_projs[m] / gather.v_projs[m] / gather_norm``. DashFusion has no output projection (``out_proj=False``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..ops import bottleneck_exchange
from .attention import MultiSourceAttention, _check_embed, merge_heads, split_heads

NORMS = ("sublayer", "post", "none")


class BottleneckFusionLevel(nn.Module):
    """bottleneck (B, K, E) and modalities [x_m (B, L_m, E)] with padding masks [pad_m (B, L_m) | None]
    → (bottleneck (B, K, E), [x_m (B, L_m, E)])."""

    def __init__(self, embed_dim: int, num_heads: int, num_modalities: int = 3, norm: str = "sublayer",
                 ffn_dim: int = 0, out_proj: bool = False, bias: bool = False, scale: Optional[float] = None,
                 backend: str = "auto"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.head_dim = _check_embed(embed_dim, num_heads)
        self.num_heads, self.norm, self.scale, self.backend = num_heads, norm, scale, backend
        M = num_modalities
        self.gather = MultiSourceAttention(embed_dim, num_heads, M, bias=bias, out_proj=out_proj, scale=scale,
                                           backend=backend)
        self.gather_norm = nn.LayerNorm(embed_dim)
        lin = lambda: nn.Linear(embed_dim, embed_dim, bias=bias)  # noqa: E731
        self.exchange_q = nn.ModuleList(lin() for _ in range(M))
        self.exchange_k = nn.ModuleList(lin() for _ in range(M))
        self.exchange_v = nn.ModuleList(lin() for _ in range(M))
        self.exchange_out = nn.ModuleList((nn.Linear(embed_dim, embed_dim) if out_proj else nn.Identity())
                                          for _ in range(M))
        self.exchange_norm = nn.ModuleList((nn.LayerNorm(embed_dim) if norm != "none" else nn.Identity())
                                           for _ in range(M))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(embed_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, embed_dim))
                                 for _ in range(M)) if ffn_dim else None
        self.ffn_norm = nn.ModuleList(nn.LayerNorm(embed_dim) for _ in range(M)) if ffn_dim else None

    def forward(self, bottleneck: Tensor, modalities: Sequence[Tensor],
                padding_masks: Optional[Sequence[Optional[Tensor]]] = None) -> tuple[Tensor, list[Tensor]]:
        M = len(self.exchange_q)
        if len(modalities) != M:
            raise ValueError(f"modalities must have {M} entries, got {len(modalities)}")
        masks = list(padding_masks) if padding_masks is not None else [None] * M
        b = self.gather_norm(bottleneck + self.gather(bottleneck, list(zip(modalities, masks))))
        h = self.num_heads
        att = bottleneck_exchange([split_heads(q(x), h) for q, x in zip(self.exchange_q, modalities)],
                                  [split_heads(k(b), h) for k in self.exchange_k],
                                  [split_heads(v(b), h) for v in self.exchange_v],
                                  query_padding_masks=masks if any(m is not None for m in masks) else None,
                                  scale=self.scale, backend=self.backend)
        outs = []
        for m, (x, a) in enumerate(zip(modalities, att)):
            a = self.exchange_out[m](merge_heads(a))
            x = self.exchange_norm[m](x + a) if self.norm == "post" else x + self.exchange_norm[m](a)
            if self.ffn is not None:
                x = x + self.ffn_norm[m](self.ffn[m](x))
            outs.append(x)
        return b, outs


class BottleneckFusion(nn.Module):
    """Hierarchical stack of ``depth`` levels over ``num_bottleneck`` learned tokens, halving K per level (HBF).

    modalities [x_m (B, L_m, E)], padding_masks [(B, L_m) | None] → (bottleneck (B, K_last, E), [x_m (B, L_m, E)]).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_modalities: int = 3, num_bottleneck: int = 8,
                 depth: int = 1, halve: bool = True, **level_kwargs):
        super().__init__()
        if not 1 <= num_bottleneck <= 16:
            raise ValueError(f"num_bottleneck must be in 1..16, got {num_bottleneck}")
        self.tokens = nn.Parameter(torch.randn(1, num_bottleneck, embed_dim) * 0.02)
        self.keep = [max(1, num_bottleneck >> i) if halve else num_bottleneck for i in range(depth)]
        self.levels = nn.ModuleList(BottleneckFusionLevel(embed_dim, num_heads, num_modalities, **level_kwargs)
                                    for _ in range(depth))

    def forward(self, modalities: Sequence[Tensor], padding_masks: Optional[Sequence[Optional[Tensor]]] = None
                ) -> tuple[Tensor, list[Tensor]]:
        b = self.tokens.expand(modalities[0].shape[0], -1, -1)
        mods = list(modalities)
        for keep, level in zip(self.keep, self.levels):
            b, mods = level(b[:, :keep], mods, padding_masks)
        return b, mods
