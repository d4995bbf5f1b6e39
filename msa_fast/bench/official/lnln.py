"""LNLN's official side (Haoyu-ha/LNLN, repository root).

Model: ``build_model(args)`` with ``configs/train_mosi.yaml`` as shipped (BERT ``bertmodel`` fine-tuned).
Step (``train.py::train``, one batch): ``out = model(complete_input, incomplete_input)`` — two full passes: the
incomplete (erased) view and the complete view, each through BERT and the three compressors —;
``MultimodalLoss`` (0.9·l_cc + 0.8·l_adv + 0.1·l_rec + 1.0·l_sp, ``core/losses.py``); ``backward``;
``optimizer.step()``; ``optimizer.zero_grad()`` with ``torch.optim.AdamW(model.parameters(), lr 1e-4, weight
decay 1e-4)``. No clipping; the warm-up scheduler steps once per epoch (not part of a step).
``features`` variant: the official ``bertmodel`` is replaced by a pass-through and the view tuples carry the
precomputed (B, L, 768) features in the text slot (the official forward reads text only through ``bertmodel``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .common import OfficialAdapter, PassThrough, isolated_import_path, patched_from_pretrained, require_modules

#: The official effectiveness labels use 8 tokens per sample (``token_length``).
TOKENS = 8


def lnln_inputs(batch, features: bool = False) -> dict[str, Any]:
    """Our (erased) batch → ``complete_input`` / ``incomplete_input`` tuples (vision, audio, text) and the labels
    dict of ``train.py::train``; ``batch.complete`` is the complete view (the batch itself when absent)."""
    complete = batch.complete if batch.complete is not None else batch

    def view(b):
        if features:
            if b.text_features is None:
                raise ValueError("the features variant needs text_features in both views")
            text = b.text_features
        else:
            text = b.text_bert
        return (b.vision, b.audio, text)

    n = batch.batch_size
    rate = batch.missing_rates[:, :1].float() if batch.missing_rates is not None else \
        torch.zeros(n, 1, device=batch.labels.device)
    labels = {"sentiment_labels": batch.labels.float().reshape(n, 1), "completeness_labels": 1.0 - rate,
              "effectiveness_labels": torch.cat([torch.ones(n * TOKENS), torch.zeros(n * TOKENS)]).long()
              .to(batch.labels.device)}
    return {"complete_input": view(complete), "incomplete_input": view(batch), "labels": labels}


class LNLNAdapter(OfficialAdapter):
    method = "lnln"
    repo = "Haoyu-ha/LNLN"
    commit = "80a052c62b7b3b7a6cb6956846e9d9c121f56eda"
    code_subdir = ""
    marker = "models/lnln.py"
    top_level = ("models", "core", "train", "robust_evaluation")
    needs = {"einops": "einops", "yaml": "pyyaml"}
    optimizer_note = "torch.optim.AdamW(model.parameters(), lr 1e-4, weight decay 1e-4) (as train.py)"
    step_note = ("forward on the incomplete and the complete view (two full passes incl. BERT), MultimodalLoss "
                 "(0.9 l_cc + 0.8 l_adv + 0.1 l_rec + 1.0 l_sp), backward, AdamW step, zero_grad; no clipping")

    def build(self, bert_config: Mapping[str, Any], features: bool, seed: int) -> nn.Module:
        import yaml

        require_modules(self.method, self.needs)
        with open(self.code_dir / "configs" / "train_mosi.yaml") as f:
            self.args = yaml.safe_load(f)
        with isolated_import_path(self.code_dir, self.top_level):
            from core.losses import MultimodalLoss
            from models.lnln import build_model

            torch.manual_seed(seed)
            with patched_from_pretrained(bert_config, features):
                model = build_model(self.args)
            self.loss_fn = MultimodalLoss(self.args)
        if features:
            model.bertmodel = PassThrough()
        return model.to(self.device)

    def inputs(self, batch, features: bool, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        return lnln_inputs(batch, features)

    def predict(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        model.eval()
        with torch.no_grad():
            out = model(inputs["complete_input"], inputs["incomplete_input"])
        return out["sentiment_preds"].reshape(-1)

    def make_step(self, model: nn.Module, inputs: Mapping[str, Any]):
        base = self.args["base"]
        optimizer = torch.optim.AdamW(model.parameters(), lr=base["lr"], weight_decay=base["weight_decay"])
        complete, incomplete, label = inputs["complete_input"], inputs["incomplete_input"], inputs["labels"]
        loss_fn = self.loss_fn
        model.train()

        def step():
            out = model(complete, incomplete)
            loss = loss_fn(out, label)
            loss["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()

        return step
