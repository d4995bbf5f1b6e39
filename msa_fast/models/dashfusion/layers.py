"""DashFusion building blocks: frame encoders, temporal alignment, hierarchical bottleneck fusion (HBF).

Shapes: B batch, L_t text tokens, L_a / L_v audio / vision frames **including** the prepended [CLS] slot,
d = d_model (128), H heads, K bottleneck tokens (8 → 4 → 2).

Every attention goes through ``msa_fast.ops``: the frame encoders use ``attention`` (key padding + dropout),
temporal alignment and ``Multi_CA`` use ``multi_source_attention`` (one softmax per source, summed, no frame masks,
as the official code), and the modality → bottleneck cross-attention of all three modalities is one
``bottleneck_exchange`` call. HBF masks text padding as keys when given the text lengths (DashFusion's default,
see ``HierarchicalBottleneckFusion``); without them it is the official unmasked fusion. Modalities are ordered (text, audio, vision) throughout; the official
argument swap (its ``encoder_a`` modules process vision) lives in the weight mapping of ``dashfusion.py``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import attention, bottleneck_exchange, dropout, masked_mean, multi_source_attention
from ...nn.attention import merge_heads, split_heads
from ...nn.dropout import Dropout


def dropout_or_identity(p: float) -> nn.Module:
    """The fused ``Dropout(p)`` (an ``nn.Dropout``), or ``nn.Identity`` for p = 0 (DashFusion's fusion dropout):
    saves a mask draw per call."""
    return Dropout(p) if p > 0 else nn.Identity()


def feed_forward(dim: int, hidden: int, dropout: float) -> nn.Sequential:
    """Linear → GELU → Dropout → Linear → Dropout (indices 0 and 3 are the Linears, as the official ``net``)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), dropout_or_identity(dropout), nn.Linear(hidden, dim),
                         dropout_or_identity(dropout))


# ---------------------------------------------------------------------------------------------------------------
# Audio / vision encoders
# ---------------------------------------------------------------------------------------------------------------
class PostLNEncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` (post-LN, GELU, batch-first here) on ``msa_fast.ops.attention``.

    Parameter names and shapes follow ``nn.TransformerEncoderLayer`` so official weights map one to one.
    Dropout (0.5 in DashFusion) acts on the attention probabilities, inside the FFN and on both residual branches.
    """

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout_p = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self.linear1 = nn.Linear(d_model, ff_dim)
        self.linear2 = nn.Linear(ff_dim, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        """x (B, L, d), key_padding_mask (B, L) bool True = padding → (B, L, d)."""
        p = self.dropout_p if self.training else 0.0
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.heads) for t in (q, k, v))
        a = attention(q, k, v, key_padding_mask=key_padding_mask, dropout_p=p)
        x = self.norm1(x + dropout(self.out_proj(merge_heads(a)), p, self.training))
        ff = self.linear2(dropout(F.gelu(self.linear1(x)), p, self.training))
        return self.norm2(x + dropout(ff, p, self.training))


class FrameEncoder(nn.Module):
    """Audio or vision encoder: project → prepend [CLS] → + position embedding → post-LN layers → LN.

    Official quirks kept: [CLS] initialised to ones, position embeddings zero-initialised with a **fixed** length
    (inputs must have exactly ``n_frames`` frames), layer dropout 0.5 (the constructor default that overrides the
    config), padded positions zeroed after the final LayerNorm, mean over the unmasked positions ([CLS] included).
    """

    def __init__(self, input_dim: int, n_frames: int, d_model: int, n_layers: int, heads: int, ff_dim: int,
                 dropout: float, input_dropout: float):
        super().__init__()
        self.input_dim = input_dim
        self.n_frames = n_frames
        self.input_proj = nn.Linear(input_dim, d_model)
        self.cls_token = nn.Parameter(torch.ones(1, 1, d_model))
        self.pos_embedding = nn.Parameter(torch.zeros(1, n_frames + 1, d_model))
        self.input_dropout = Dropout(input_dropout)
        self.layers = nn.ModuleList(PostLNEncoderLayer(d_model, heads, ff_dim, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, frames: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        """frames (B, n_frames, D_in), padding_mask (B, n_frames + 1) bool (column 0 = [CLS])
        → all (B, n_frames + 1, d) with padded rows zeroed, mean (B, d)."""
        x = self.input_proj(frames)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        x = self.input_dropout(x)
        for layer in self.layers:
            x = layer(x, padding_mask)
        valid = ~padding_mask
        x = self.norm(x) * valid.unsqueeze(-1).to(x.dtype)
        return x, masked_mean(x, valid)


class TextProjector(nn.Sequential):
    """BERT features (B, L, 768) → Linear (no bias) → GELU → Linear (no bias) → GELU → LayerNorm → (B, L, d).

    (The official ``FeatureProjector`` also computes a Dropout(0.1) of its input and discards it: omitted.)
    """

    def __init__(self, input_dim: int, d_model: int):
        super().__init__(nn.Linear(input_dim, d_model, bias=False), nn.GELU(), nn.Linear(d_model, d_model, bias=False),
                         nn.GELU(), nn.LayerNorm(d_model))


# ---------------------------------------------------------------------------------------------------------------
# Temporal alignment
# ---------------------------------------------------------------------------------------------------------------
class TemporalAlignment(nn.Module):
    """H = t + to_out(softmax(q·k_aᵀ)·v_a + softmax(q·k_vᵀ)·v_v): text queries over audio and vision frames.

    Two separate softmaxes summed (``multi_source_attention``), bias-free projections, scale dim_head^-½,
    **no masks** (official: padded frames are zero vectors and still take part; padded text rows get uniform
    attention). The official unused ``ffn`` / ``norm1`` / ``norm2`` are not built.
    """

    def __init__(self, d_model: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_k_ta = nn.Linear(d_model, inner, bias=False)
        self.to_v_ta = nn.Linear(d_model, inner, bias=False)
        self.to_k_tv = nn.Linear(d_model, inner, bias=False)
        self.to_v_tv = nn.Linear(d_model, inner, bias=False)
        self.to_out = nn.Linear(inner, d_model)
        self.out_dropout = dropout_or_identity(dropout)

    def forward(self, text: Tensor, audio: Tensor, vision: Tensor) -> Tensor:
        """text (B, L_t, d), audio (B, L_a, d), vision (B, L_v, d) → H (B, L_t, d)."""
        h = self.heads
        q = split_heads(self.to_q(text), h)
        sources = [(split_heads(self.to_k_ta(audio), h), split_heads(self.to_v_ta(audio), h), None),
                   (split_heads(self.to_k_tv(vision), h), split_heads(self.to_v_tv(vision), h), None)]
        out = multi_source_attention(q, sources, scale=self.scale)
        return text + self.out_dropout(self.to_out(merge_heads(out)))


# ---------------------------------------------------------------------------------------------------------------
# Hierarchical bottleneck fusion
# ---------------------------------------------------------------------------------------------------------------
class PostNormAttentionBlock(nn.Module):
    """One official ``TransformerEncoder`` / ``CrossTransformerEncoder`` layer (the "PostNorm" variant):

        x ← x + LN₁(Attn(x, src, src));   x ← x + LN₂(FFN(x))

    (LayerNorm on the sub-layer output **before** the residual add). ``Attn``: biased q/k/v projections
    (d → d), H heads, **no output projection**, scale d^-½ (not the head dimension).
    """

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = d_model ** -0.5
        self.to_query = nn.Linear(d_model, d_model)
        self.to_key = nn.Linear(d_model, d_model)
        self.to_value = nn.Linear(d_model, d_model)
        self.attn_norm = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, ff_dim, dropout)
        self.ffn_norm = nn.LayerNorm(d_model)

    def queries(self, x: Tensor) -> Tensor:
        return split_heads(self.to_query(x), self.heads)

    def keys_values(self, src: Tensor) -> tuple[Tensor, Tensor]:
        return split_heads(self.to_key(src), self.heads), split_heads(self.to_value(src), self.heads)

    def finish(self, x: Tensor, attn_out: Tensor) -> Tensor:
        """Residual + LN + FFN after the attention; attn_out (B, H, L, D) → (B, L, d)."""
        x = x + self.attn_norm(merge_heads(attn_out))
        return x + self.ffn_norm(self.ffn(x))

    def forward(self, x: Tensor, src: Tensor, n_queries: Optional[int] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x (B, L, d) attends to src (B, S, d) → (B, L', d); ``n_queries`` keeps only the first rows of x;
        ``key_padding_mask`` (B, S) bool True = the src row is not a key (None: every row is one, official).

        Only rows are independent here (attention per query row, then row-wise LN/FFN), so computing the first
        ``n_queries`` rows equals slicing the full output.
        """
        if n_queries is not None:
            x = x[:, :n_queries]
        k, v = self.keys_values(src)
        return self.finish(x, attention(self.queries(x), k, v, key_padding_mask=key_padding_mask, scale=self.scale))


class MultiSourceBottleneckGather(nn.Module):
    """Official ``Multi_CA``: bottleneck queries gather from text, audio and vision tokens.

        out = LN₁(q + Σ_m softmax(Q·K_mᵀ·s)·V_m);   out = LN₂(out + FFN(out))

    One softmax per modality (``multi_source_attention``, no masks), bias-free projections, no output projection,
    s = (d / H)^-½. ``to_k[m]`` / ``to_v[m]`` for m in (text, audio, vision).
    """

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.scale = (d_model // heads) ** -0.5
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_k = nn.ModuleList(nn.Linear(d_model, d_model, bias=False) for _ in range(3))
        self.to_v = nn.ModuleList(nn.Linear(d_model, d_model, bias=False) for _ in range(3))
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = feed_forward(d_model, ff_dim, dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, query: Tensor, modalities: tuple[Tensor, Tensor, Tensor],
                key_padding_masks: Optional[tuple[Optional[Tensor], ...]] = None) -> Tensor:
        """query (B, K, d); modalities (text, audio, vision) each (B, L_m, d) → (B, K, d); ``key_padding_masks``:
        one (B, L_m) bool (True = not a key) or None per modality (None: no masks, official)."""
        h = self.heads
        masks = key_padding_masks if key_padding_masks is not None else (None,) * len(modalities)
        sources = [(split_heads(k(x), h), split_heads(v(x), h), m)
                   for k, v, x, m in zip(self.to_k, self.to_v, modalities, masks)]
        out = self.norm1(query + merge_heads(multi_source_attention(split_heads(self.to_q(query), h), sources,
                                                                    scale=self.scale)))
        return self.norm2(out + self.ffn(out))


class HBFLevel(nn.Module):
    """One HBF level: bottleneck self-attention, gather from the modalities, modalities attend to the bottleneck."""

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.query_self = PostNormAttentionBlock(d_model, heads, ff_dim, dropout)
        self.query_gather = MultiSourceBottleneckGather(d_model, heads, ff_dim, dropout)
        self.exchange = nn.ModuleList(PostNormAttentionBlock(d_model, heads, ff_dim, dropout) for _ in range(3))


MODALITY_ORDER = ("text", "audio", "vision")


class HierarchicalBottleneckFusion(nn.Module):
    """HBF (official ``HierarchicalBottleneckFusion``), ``depth`` levels keeping 8, 4, 2, … bottleneck tokens.

    Level ℓ: q ← SelfEnc(q)[:, :keep] (level 0: over H, so the bottleneck is the first 8 rows of H, no learned
    tokens); q ← Multi_CA(q, text, audio, vision); m ← CrossEnc_m(m, q) for every modality; keep ← max(1, keep//2).
    Output: cat(q[:,0], text[:,0], vision[:,0], audio[:,0]) (B, 4d) — the official concatenation order.

    ``prune_rows=True`` (default) computes only the rows that are used, with identical results: the self-attention
    computes its ``keep`` query rows only (keys are still every row), and the last level updates only token 0 of
    each modality. ``prune_rows=False`` is the straightforward path (for tests).

    ``text_lengths`` (B,) int (DashFusion's default): row j of the text / of H / of the bottleneck (the bottleneck
    rows are H's first rows) is a key only for j < text_lengths — in the level-0 self-attention over H, the gather
    from the text, the bottleneck self-attention and the modality → bottleneck exchange — so every sample gets what
    it gets alone, with its text cropped to its own length (the official model, fed one sample). ``None``: the
    official unmasked fusion, where padding up to the longest text of the batch takes part.
    """

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float, depth: int, n_bottleneck: int = 8):
        super().__init__()
        if depth < 1:
            raise ValueError(f"fusion_depth must be >= 1, got {depth}")
        self.n_bottleneck = n_bottleneck
        self.levels = nn.ModuleList(HBFLevel(d_model, heads, ff_dim, dropout) for _ in range(depth))

    def forward(self, h: Tensor, text: Tensor, audio: Tensor, vision: Tensor, prune_rows: bool = True,
                text_lengths: Optional[Tensor] = None) -> dict[str, Tensor]:
        """h (B, L_t, d) aligned text; text/audio/vision (B, L_m, d); text_lengths (B,) or None (see the class
        docstring) → {"fused": (B, 4d), per-level tensors}."""
        out: dict[str, Tensor] = {}
        mods = [text, audio, vision]
        query = h
        keep = self.n_bottleneck
        last = len(self.levels) - 1
        if text_lengths is None:
            def pad(rows: int) -> Optional[Tensor]:
                return None
        else:
            lengths = text_lengths.to(h.device).clamp_min(1)[:, None]
            positions = torch.arange(h.shape[1], device=h.device)[None]

            def pad(rows: int) -> Optional[Tensor]:
                return positions[:, :rows] >= lengths  # (B, rows) True = text padding (not a key)
        for lvl, level in enumerate(self.levels):
            if prune_rows:
                query = level.query_self(query, query, n_queries=keep, key_padding_mask=pad(query.shape[1]))
            else:
                query = level.query_self(query, query, key_padding_mask=pad(query.shape[1]))[:, :keep]
            out[f"hbf.{lvl}.self"] = query
            query = level.query_gather(query, tuple(mods), (pad(mods[0].shape[1]), None, None))
            out[f"hbf.{lvl}.bottleneck"] = query
            if lvl == last and prune_rows:
                mods = [m[:, :1] for m in mods]  # only token 0 of each modality is read after the last level
            blocks = level.exchange
            kv = [blk.keys_values(query) for blk in blocks]
            att = bottleneck_exchange([blk.queries(m) for blk, m in zip(blocks, mods)], [k for k, _ in kv],
                                      [v for _, v in kv], key_padding_mask=pad(query.shape[1]),
                                      scale=blocks[0].scale)
            mods = [blk.finish(m, a) for blk, m, a in zip(blocks, mods, att)]
            for name, m in zip(MODALITY_ORDER, mods):
                out[f"hbf.{lvl}.{name}" + (".token0" if lvl == last else "")] = m[:, :1] if lvl == last else m
            keep = max(1, keep // 2)
        t, a, v = mods
        out["hbf.fused"] = torch.cat([query[:, 0], t[:, 0], v[:, 0], a[:, 0]], dim=-1)
        return out
