"""Invariance objectives across source domains for MIDG (reconstruction: the spec's option set, all INFERRED).

- ``dann``: cross-entropy of a domain classifier on the gradient-reversed pooled expert output (the classifier
  learns the domain, the encoder learns to hide it);
- ``vrex``: V-REx, the variance of the per-domain task risks (Krueger et al. 2021);
- ``irm``: IRM-v1, Σ_d (∂R_d(w·f)/∂w at w = 1)² (Arjovsky et al. 2019), in closed form ℓ'(p, y)·p so it also runs
  under ``torch.no_grad`` (validation loss);
- ``none``: the no-invariance ablation.

Only samples of *source* domains (0 ≤ id < num_domains) count: an unseen domain's samples (the DG target at test
time) have no term. With fewer than two source domains in a batch every penalty is 0 (nothing to be invariant
across).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import task_loss

INVARIANCES = ("dann", "vrex", "irm", "none")


def _source_domains(domain: Optional[Tensor], num_domains: int, n: int, device) -> tuple[Tensor, Tensor]:
    """(domain ids (B,), bool (B,) rows from a source domain); no ids = every row from domain 0."""
    if domain is None:
        d = torch.zeros(n, dtype=torch.long, device=device)
    else:
        d = domain.to(device=device, dtype=torch.long)
    return d, (d >= 0) & (d < num_domains)


def dann_loss(domain_logits: Tensor, domain: Optional[Tensor], num_domains: int) -> Tensor:
    """Mean cross-entropy of the domain classifier over source rows: logits (B, num_domains)."""
    d, seen = _source_domains(domain, num_domains, domain_logits.shape[0], domain_logits.device)
    if num_domains < 2 or not bool(seen.any()):
        return domain_logits.new_zeros(())
    return F.cross_entropy(domain_logits[seen], d[seen])


def _per_domain(values: Tensor, domain: Optional[Tensor], num_domains: int) -> Tensor:
    """(D_present,) mean of ``values`` (B,) per source domain present in the batch."""
    d, seen = _source_domains(domain, num_domains, values.shape[0], values.device)
    d, values = d[seen], values[seen]
    sums = values.new_zeros(num_domains).index_add(0, d, values)
    counts = torch.bincount(d, minlength=num_domains).to(values.dtype)
    present = counts > 0
    return sums[present] / counts[present]


def vrex_penalty(pred: Tensor, labels: Tensor, domain: Optional[Tensor], num_domains: int, kind: str) -> Tensor:
    """Variance (population) of the per-domain mean task losses."""
    risks = _per_domain(task_loss(pred, labels, kind, reduction="none"), domain, num_domains)
    if risks.numel() < 2:
        return pred.new_zeros(())
    return risks.var(unbiased=False)


def irm_penalty(pred: Tensor, labels: Tensor, domain: Optional[Tensor], num_domains: int, kind: str) -> Tensor:
    """IRM-v1: Σ_d (mean_{i ∈ d} ℓ'(p_i, y_i)·p_i)², the squared gradient of each domain's risk w.r.t. a scalar
    multiplier of the predictions at 1 (ℓ' = sign(p − y) for L1, 2(p − y) for MSE)."""
    diff = pred - labels
    dloss = torch.sign(diff) if kind == "l1" else 2.0 * diff
    grads = _per_domain(dloss * pred, domain, num_domains)
    if grads.numel() < 2:
        return pred.new_zeros(())
    return (grads ** 2).sum()
