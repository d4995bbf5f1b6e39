"""MMCL layers: the decoupling module, the actor (per-token gates + predictor) and the critic.

Official code: smwanghhh/MMCL ``network.py`` (``Model``, ``Actor``, ``Critic``). Attribute names follow the official
ones (``text_map``, ``attention_text``, ``text_action``, ``temporal_t``, ``weight_t``, ``predict``, ``critic_t``,
``proj``) so an official state_dict loads with a prefix rename. Shapes: B batch, L shared sequence length (all
modalities, word-aligned), d = ``hidden`` (128), h = ``heads`` (4); a state / diff / shared tensor is (B, 3L, d) =
the text, audio and vision tokens concatenated along the sequence.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import attention


class EncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (post-LN, ReLU; same parameters and state_dict keys) whose forward, when it
    has no dropout (official ``atten_dropout`` 0) and no masks, runs the library's attention op on the packed
    in-projection and an in-place ReLU on the FFN hidden layer: the same function without torch's per-call input
    transposes/copies and the extra (B·L, FFN) buffers (the FFN is 2048 wide: its ReLU was ~17 % of a CPU step).
    Anything else goes to torch's forward."""

    def forward(self, src: Tensor, src_mask=None, src_key_padding_mask=None, is_causal: bool = False) -> Tensor:
        mha = self.self_attn
        if (src_mask is not None or src_key_padding_mask is not None or self.norm_first or not mha.batch_first
                or self.activation_relu_or_gelu != 1 or (self.training and self.dropout.p > 0)):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        b, n, d = src.shape
        h = mha.num_heads
        q, k, v = F.linear(src, mha.in_proj_weight, mha.in_proj_bias).view(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        ctx = attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = self.norm1(src + mha.out_proj(ctx))
        return self.norm2(x + self.linear2(torch.relu_(self.linear1(x))))


def encoder_clones(d_model: int, heads: int, ffn_dim: int, dropout: float, n: int = 3) -> list[nn.TransformerEncoder]:
    """``n`` one-layer post-LN ReLU ``nn.TransformerEncoder`` built from ONE layer object: the official code passes
    the same ``TransformerEncoderLayer`` to its three encoders, which deep-copy it, so the three start with identical
    weights (kept). Batch-first here (the official code permutes to sequence-first: same function)."""
    layer = EncoderLayer(d_model, heads, dim_feedforward=ffn_dim, dropout=dropout, batch_first=True)
    return [nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False) for _ in range(n)]


class SelfAttention(nn.Module):
    """Official ``Self_Attention``: biased q/k/v, softmax(QKᵀ/√(d/h)) (dropout) V, out = LN(ctx + dense1(ctx)) —
    no residual from the input (quirk kept). (B, L, d) → (B, L, d)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden ({dim}) must be divisible by heads ({heads})")
        self.heads, self.p = heads, float(dropout)
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dense1 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, h, L, d/h)."""
        b, n, d = x.shape

        def split(t: Tensor) -> Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        return split(self.query(x)), split(self.key(x)), split(self.value(x))

    def finish(self, ctx: Tensor) -> Tensor:
        """ctx (B, h, L, d/h) → LN(ctx + dense1(ctx)) (B, L, d)."""
        b, h, n, dh = ctx.shape
        ctx = ctx.transpose(1, 2).reshape(b, n, h * dh)
        return self.norm(ctx + self.dense1(ctx))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.project(x)
        return self.finish(attention(q, k, v, dropout_p=self.p if self.training else 0.0))


def decouple(x: Tensor) -> tuple[Tensor, Tensor]:
    """Parameter-free decoupling of three equal-length modalities.

    x (B, 3, L, d) mapped text / audio / vision tokens → (common, specific), each (B, 3, L, d):
    Sim_X = softmax_row(min over the two other modalities Y of cos(x_i, y_j)); common_X = Sim_X·X;
    specific_X = softmax_row(1 − Sim_X)·X (official; 1 − Sim_X is nearly constant per row, so specific ≈ the token
    mean — an architecture quirk kept). One Gram matrix of all 3L tokens gives the six cross-modal similarity blocks
    (the diagonal blocks are masked out of the min), and one batched matmul applies both weightings.
    """
    b, m, n, d = x.shape
    tokens = F.normalize(x, p=2, dim=-1).reshape(b, m * n, d)
    gram = torch.bmm(tokens, tokens.transpose(1, 2)).view(b, m, n, m, n)
    own = torch.eye(m, dtype=torch.bool, device=x.device).view(1, m, 1, m, 1)
    closest = gram.masked_fill(own, math.inf).amin(dim=3)  # (B, 3, L, L): min of the two cross-modal similarities
    sim = torch.softmax(closest, dim=-1)
    weights = torch.cat([sim, torch.softmax(1.0 - sim, dim=-1)], dim=2)  # (B, 3, 2L, L)
    both = torch.matmul(weights, x)  # (B, 3, 2L, d)
    return both[:, :, :n], both[:, :, n:]


class Decoupler(nn.Module):
    """Official ``Model``: input maps → decoupling → intra-modal self-attention on the common part.

    text (B, L, D_t), audio (B, L, D_a), vision (B, L, D_v) (one shared L) → shared (B, 3L, d) (attended common
    tokens), diff (B, 3L, d) (specific tokens), both in text / audio / vision order.
    """

    def __init__(self, dims: Sequence[int], hidden: int = 128, heads: int = 4, atten_dropout: float = 0.0):
        super().__init__()
        d_t, d_a, d_v = dims
        self.text_map, self.audio_map, self.vision_map = nn.Linear(d_t, hidden), nn.Linear(d_a, hidden), \
            nn.Linear(d_v, hidden)
        self.attention_text = SelfAttention(hidden, heads, atten_dropout)
        self.attention_audio = SelfAttention(hidden, heads, atten_dropout)
        self.attention_vision = SelfAttention(hidden, heads, atten_dropout)

    def forward(self, text: Tensor, audio: Tensor, vision: Tensor) -> tuple[Tensor, Tensor]:
        lengths = (text.shape[1], audio.shape[1], vision.shape[1])
        if len(set(lengths)) != 1:
            raise ValueError(f"MMCL's decoupling needs one shared sequence length, got text/audio/vision {lengths}")
        x = torch.stack([self.text_map(text), self.audio_map(audio), self.vision_map(vision)], dim=1)
        common, specific = decouple(x)
        b, m, n, d = common.shape
        # the three attentions differ only in their weights: one attention launch for all of them
        attns = (self.attention_text, self.attention_audio, self.attention_vision)
        qkv = [a.project(common[:, i]) for i, a in enumerate(attns)]
        q, k, v = (torch.cat([t[j] for t in qkv], dim=0) for j in range(3))
        p = attns[0].p if self.training else 0.0
        ctx = attention(q, k, v, dropout_p=p).split(b, dim=0)
        shared = torch.cat([a.finish(c) for a, c in zip(attns, ctx)], dim=1)
        return shared, specific.reshape(b, m * n, d)


class ActionGates(nn.Module):
    """The policy: per-token sigmoid gates ``{text,audio,vision}_action`` = Linear(d→1) + Sigmoid on each modality's
    third of the state. state (B, 3L, d) → action (B, 3L, 1). (Also the actor target: only the gates of the actor
    ever run in the target network.)"""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.text_action = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())
        self.audio_action = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())
        self.vision_action = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())

    def gate_modules(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.text_action[0], self.audio_action[0], self.vision_action[0]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for lin in self.gate_modules() for p in (lin.weight, lin.bias)]

    def act(self, state: Tensor) -> Tensor:
        b, n3, d = state.shape
        lins = self.gate_modules()
        w = torch.stack([lin.weight[0] for lin in lins]).unsqueeze(-1)  # (3, d, 1): one matmul for three gates
        bias = torch.stack([lin.bias for lin in lins]).view(1, 3, 1, 1)
        return torch.sigmoid(torch.matmul(state.view(b, 3, n3 // 3, d), w) + bias).view(b, n3, 1)

    def forward(self, state: Tensor) -> Tensor:
        return self.act(state)


class Actor(ActionGates):
    """Official ``Actor``: the gates plus the predictor (the classifier/regressor lives inside the actor and is
    updated by the actor optimizer).

    ``predictor(shared, gated_diff)`` (B, 3L, d) each → (B, out_dim): per modality shared mean over L, gated diff →
    one-layer TransformerEncoder (FFN ``ffn_dim``, 2048 official) → mean over L; emb = cat(shared, diff) (B, 2d)
    weighted by a sigmoid score ``weight_x``; ``predict``((emb_t + emb_a + emb_v)/3) = Linear 2d→d, Dropout,
    ReLU, BatchNorm1d, Linear d→out_dim (8 = IEMOCAP's 4 binary emotions, 1 = MSA regression).
    """

    def __init__(self, hidden: int = 128, heads: int = 4, ffn_dim: int = 2048, dropout: float = 0.5,
                 atten_dropout: float = 0.0, out_dim: int = 1):
        super().__init__(hidden)
        self.temporal_t, self.temporal_a, self.temporal_v = encoder_clones(hidden, heads, ffn_dim, atten_dropout)

        def weight() -> nn.Sequential:
            return nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Dropout(0.0), nn.Linear(hidden, 1), nn.Sigmoid())

        self.weight_t, self.weight_a, self.weight_v = weight(), weight(), weight()
        self.predict = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Dropout(dropout), nn.ReLU(),
                                     nn.BatchNorm1d(hidden), nn.Linear(hidden, out_dim))

    def predictor(self, shared: Tensor, gated_diff: Tensor) -> Tensor:
        n = shared.shape[1] // 3
        embs = []
        for i, (temporal, weight) in enumerate(((self.temporal_t, self.weight_t), (self.temporal_a, self.weight_a),
                                                (self.temporal_v, self.weight_v))):
            part = slice(i * n, (i + 1) * n)
            emb = torch.cat([shared[:, part].mean(1), temporal(gated_diff[:, part]).mean(1)], dim=-1)
            embs.append(emb * weight(emb))
        return self.predict((embs[0] + embs[1] + embs[2]) / 3)


class Critic(nn.Module):
    """Official ``Critic``: Q(state, action). The action (B, 3L, 1) is repeated ``heads`` times along features and
    concatenated to the state → (B, 3L, d + h); per modality a one-layer TransformerEncoder (d + h, h heads, FFN
    ``ffn_dim``) → mean over L; cat (B, 3(d+h)) → ``proj`` = Linear → 2d, Linear → d, Dropout, ReLU, BatchNorm1d,
    Linear → 1. Returns Q (B,)."""

    def __init__(self, hidden: int = 128, heads: int = 4, ffn_dim: int = 2048, dropout: float = 0.5,
                 atten_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        width = hidden + heads
        if width % heads:
            raise ValueError(f"hidden + heads ({width}) must be divisible by heads ({heads}) for the critic")
        self.critic_t, self.critic_a, self.critic_v = encoder_clones(width, heads, ffn_dim, atten_dropout)
        self.proj = nn.Sequential(nn.Linear(3 * width, 2 * hidden), nn.Linear(2 * hidden, hidden), nn.Dropout(dropout),
                                  nn.ReLU(), nn.BatchNorm1d(hidden), nn.Linear(hidden, 1))

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        n = state.shape[1] // 3
        x = torch.cat([state, action.expand(-1, -1, self.heads)], dim=-1)
        pooled = [enc(x[:, i * n:(i + 1) * n]).mean(1)
                  for i, enc in enumerate((self.critic_t, self.critic_a, self.critic_v))]
        return self.proj(torch.cat(pooled, dim=-1))[:, 0]


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters take no gradient (a target network)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target
