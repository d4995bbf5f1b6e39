"""Optimizers and learning-rate schedules of the trainer."""
from __future__ import annotations

import math

import torch
from torch import nn
from .config import TrainConfig



# ---- optimisation -----------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``model.optimizer_param_groups()`` (if defined) or all parameters; ``bert_lr`` splits groups."""
    if hasattr(model, "optimizer_param_groups"):
        groups = [dict(g) for g in model.optimizer_param_groups()]
    else:
        groups = [{"params": [p for p in model.parameters()]}]
    for g in groups:
        g["params"] = [p for p in g["params"] if p.requires_grad]
        g.setdefault("weight_decay", cfg.weight_decay)
        g.setdefault("lr", cfg.lr)
    if cfg.bert_lr is not None:
        bert_ids = {id(p) for n, p in model.named_parameters() if "bert" in n.lower()}
        split = []
        for g in groups:
            for is_bert in (True, False):
                params = [p for p in g["params"] if (id(p) in bert_ids) == is_bert]
                if params:
                    split.append({**g, "params": params, "lr": float(cfg.bert_lr) if is_bert else g["lr"]})
        groups = split
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return adamw(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon or 1e-8)


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with the fused implementation where torch has one (float parameters on CPU / CUDA):
    the same update rule in one kernel over all tensors — measured 145 → 36 ms per step for HME's 1 045 parameter
    tensors on 2 CPU cores (the default per-tensor loop launches ~10 ops per tensor)."""
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else list(params)
    fusable = bool(tensors) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, fused=fusable or None, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` stepped per batch (or per epoch when ``cfg.schedule_step == "epoch"``): linear warm-up over
    ``warmup_epochs``, then constant / linear decay / cosine."""
    if cfg.schedule_step == "epoch":
        steps_per_epoch = 1
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = cfg.epochs * steps_per_epoch if cfg.epochs is not None else None
    schedule = cfg.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

