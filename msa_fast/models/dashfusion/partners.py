"""DashFusion's semantic alignment: partner draw and the fixed-pattern NT-Xent loss.

Per anchor the official loader returns 6 partners ordered [ss, ss, dd, dd, sd, sd] (ss: similar features and same
label; dd: dissimilar, different label; sd: similar, different label = hard negatives), each pair drawn without
replacement from a pool of 10. Here the draw is counter-based (a hash of seed, epoch and anchor row) instead of
Python's global ``random``; the pools come from ``msa_fast.retrieval.partners`` (see ``retrieve_partner_pools``).
Train-split row access (partner lookup, re-encoding) is ``msa_fast.data.dataset.SplitRows``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...retrieval.partners import label_aware_partners
from ...testing.reference import counter_rng_bits

PARTNER_KINDS = ("ss", "dd", "sd")  # draw order per anchor: 2 of each
PARTNERS_PER_ANCHOR = 6
GROUP = 1 + PARTNERS_PER_ANCHOR  # anchor + its partners, per feature family


# ---------------------------------------------------------------------------------------------------------------
# The official 22-positive / 16-negative pair pattern on the 28 rows [t̄ ×7, v̄ ×7, ā ×7, H̄ ×7]
# ---------------------------------------------------------------------------------------------------------------
def official_pair_indices() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a1, p, a2, n) exactly as the official ``indices_tuple`` (rows: family·7 + member, member 0 = anchor)."""
    a1 = [k for k in range(GROUP) for _ in range(2)] + [0, 0, 7, 7, 14, 14, 21, 21]
    p = [x for k in range(GROUP) for x in (7 + k, 14 + k)] + [1, 2, 8, 9, 15, 16, 22, 23]
    a2 = [f * GROUP for f in range(4) for _ in range(4)]
    n = [f * GROUP + o for f in range(4) for o in range(3, 7)]
    return tuple(torch.tensor(x) for x in (a1, p, a2, n))  # type: ignore[return-value]


def partner_ntxent_loss(features: Tensor, temperature: float) -> Tensor:
    """Official ``cont_NTXentLoss`` with the fixed pair pattern, vectorised over anchors.

    features (B, 4, 7, D): families (text mean, vision mean, audio mean, fused H[:, 0]) × (anchor, 6 partners).
    Per positive pair (a, p): −log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n ∈ neg(a)} e^{s_an/τ})) with cosine similarity;
    mean over the 22 positive pairs (the 12 whose anchor has no negatives contribute 0), then mean over anchors.
    → scalar. (The official ``+ tiny`` inside the log is below float resolution for cosine/τ ∈ [−2, 2].)
    """
    if features.dim() != 4 or features.shape[1:3] != (4, GROUP):
        raise ValueError(f"features must be (B, 4, {GROUP}, D), got {tuple(features.shape)}")
    b = features.shape[0]
    x = F.normalize(features.reshape(b, 4 * GROUP, -1), dim=-1)
    a1, p, a2, n = (t.to(features.device) for t in official_pair_indices())
    sim = torch.matmul(x, x.transpose(1, 2)) / temperature  # (B, 28, 28)
    pos = sim[:, a1, p]  # (B, 22)
    neg_of = torch.zeros(4 * GROUP, 4 * GROUP, dtype=torch.bool, device=features.device)
    neg_of[a2, n] = True
    neg = sim[:, a1].masked_fill(~neg_of[a1], float("-inf"))  # (B, 22, 28)
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)
    return (torch.logsumexp(logits, dim=-1) - pos).mean()


# ---------------------------------------------------------------------------------------------------------------
# Partner pools and the per-step draw
# ---------------------------------------------------------------------------------------------------------------
def retrieval_labels(labels: Tensor, round_labels: bool) -> Tensor:
    """MOSI/MOSEI: round half to even (``np.round``) into 7 classes; SIMS: the raw value."""
    return torch.round(labels) if round_labels else labels


def retrieve_partner_pools(features: Tensor, labels: Tensor, k: int, rank_index_bug: bool,
                           window_top: float, window_bottom: float) -> dict[str, Tensor]:
    """Label-aware partner pools {"ss", "dd", "sd"} → (N, k) int64 train rows on the CPU (−1 = empty slot).

    features (N, F) pooled (t̄, v̄, ā); labels (N,) already rounded where the dataset asks for it
    (``msa_fast.retrieval.partners.label_aware_partners``: blocked GEMM + top-K scan, official semantics).
    """
    pools = label_aware_partners(features, labels, k=k, rank_index_bug=rank_index_bug, window_top=window_top,
                                 window_bottom=window_bottom)
    return {kind: pools[kind].long().cpu() for kind in PARTNER_KINDS}


def draw_partners(pools: dict[str, Tensor], anchors: Tensor, seed: int) -> Tensor:
    """Two distinct partners of each kind per anchor, ordered [ss, ss, dd, dd, sd, sd] → (B·6,) train rows.

    pools[kind] (N, k) with −1 marking empty slots (a pool may hold fewer than k); anchors (B,) train rows.
    A pool with one entry gives it twice; an empty pool gives the anchor itself (the official code would fail).
    The draw of an anchor is a function of (``seed``, anchor row) only — counter-based random keys, the dropout
    RNG's hash — so it does not depend on which other samples share the batch or on which rank the anchor is
    trained: data-parallel ranks draw exactly the partners one process draws.
    """
    anchors = anchors.cpu().long()
    picks = []
    for kind_index, kind in enumerate(PARTNER_KINDS):
        pool = pools[kind][anchors]  # (B, k)
        valid = pool >= 0
        k = pool.shape[1]
        counters = (anchors[:, None] * len(PARTNER_KINDS) + kind_index) * k + torch.arange(k)
        # Random keys, invalid slots last: the first two columns of the sort are a uniform draw without replacement.
        keys = counter_rng_bits(int(seed) % 2**64, counters).masked_fill(~valid, 2**32)
        order = keys.argsort(dim=1, stable=True)
        n_valid = valid.sum(dim=1, keepdim=True)
        cols = torch.minimum(torch.arange(2).expand(len(pool), 2), (n_valid - 1).clamp_min(0))
        chosen = pool.gather(1, order.gather(1, cols))
        picks.append(torch.where(n_valid > 0, chosen, anchors[:, None]))
    return torch.stack(picks, dim=1).reshape(-1)
