"""MIDG — Mixture of Invariant Experts + Cross-Modal Adapter (Li, Luo, Hu, arXiv 2512.07430): a reconstruction, not the authors' code.

No public code exists; spec ``method_midg.md`` (abstract-level facts only). Every design choice below is INFERRED
and is a configuration key. Shapes: B batch, L_t / L_a / L_v token counts, d = ``d_model``, d_text text-encoder
width, E = ``num_experts``.

Forward:
1. audio / vision (B, L_m, D_m) → per-domain input projections ``DomainProjection`` (one learned map per source
   domain, selected by ``Batch.domain``; an unseen domain — the DG target — uses the mean of the source maps;
   ``domain_projection="shared"``: one map) → (B, L_m, d).
2. text: a frozen BERT (``freeze_text_encoder``) with a Cross-Modal Adapter after each layer (LN → down d_text → r →
   cross-attention to the audio / vision tokens with key-padding masks, one softmax per modality → up r → d_text →
   residual · gate, gate initialised at 0); with ``use_text_features=True`` precomputed features and one adapter.
   Then Linear d_text → d.
3. tokens = [text; audio; vision] + modality embeddings (B, L, d) → ``moie_depth`` MoIE layers (per-token router
   conditioned on the cross-modal summary, dense soft mixture or top-k; experts through the fused
   ``msa_fast.ops.expert_mixture``) → pooled = mean of the modalities' masked token means (B, d).
4. M = MLP(pooled) (B,); domain logits = classifier(GRL(pooled)) (B, num_domains) for ``invariance="dann"``.

Loss: task (``task_loss`` l1 | mse) + ``invariance_weight`` · {dann CE | V-REx | IRM-v1 | 0} +
``load_balance_weight`` · Switch load balance (top-k only). ``num_domains`` = number of *source* domains (the DG
protocol sets it); with one domain every invariance term is 0, so the single-dataset setting trains the task only.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ...data.batch import Batch
from ...nn.text_encoder import build_bert
from ..base import MSAModel
from ..lnln.layers import GradientReversalLayer
from ..registry import register
from .invariance import INVARIANCES, dann_loss, irm_penalty, vrex_penalty
from .layers import (AdaptedTextEncoder, CrossModalAdapter, DomainProjection, MixtureOfInvariantExperts,
                     domain_classifier, modality_mean, task_loss)

DOMAIN_PROJECTIONS = ("per_domain", "shared")
TASK_LOSSES = ("l1", "mse")


@register("midg")
class MIDG(MSAModel):
    """MIDG (reconstruction, not the authors' code) on a ``Batch`` whose optional ``domain`` field (B,) holds each
    sample's domain id (None = one domain).

    ``forward(batch) -> dict``: ``M`` (B,), ``pooled`` (B, d), ``tokens`` (B, L_t+L_a+L_v, d), ``text`` (B, L_t,
    d_text) adapted text states, ``domain_logits`` (B, num_domains; ``invariance="dann"`` with ≥ 2 source domains),
    ``load_balance`` scalar, ``gates.{i}`` (N_i, E)
    router probabilities of layer i's valid tokens.
    """

    provenance = "reconstruction, not the authors' code"
    TINY_CONFIG = {"use_text_features": True, "d_model": 32, "adapter_dim": 16, "adapter_heads": 2,
                   "num_experts": 4, "expert_hidden": 64, "domain_hidden": 16}
    CONFIGS: dict[str, dict[str, Any]] = {
        "common": {
            # spec §2: a multilingual encoder, so that cross-lingual pairs (SIMS is Chinese) share one text space
            "bert": "bert-base-multilingual-cased",
            "use_text_features": False,
            "freeze_text_encoder": True,
            "d_model": 128,
            "adapter_dim": 64,  # r
            "adapter_heads": 4,
            "adapter_dropout": 0.1,
            "num_experts": 4,
            "expert_hidden": 512,  # 4·d
            "expert_activation": "gelu",
            "moie_depth": 1,
            "routing": "dense",  # | "topk"
            "top_k": 2,
            "router_context": "cross_modal",  # | "token"
            "load_balance_weight": 0.01,  # top-k only
            "invariance": "dann",  # | "vrex" | "irm" | "none"
            "invariance_weight": 0.1,
            # the classifier learns from invariance_weight·CE (Adam makes that scale irrelevant to it); the encoder
            # gets the reversed gradient × grl_alpha·invariance_weight = 1: a unit-weight adversary (measured on the
            # synthetic DG domains: alpha 1 barely moved the target, 10 removed most of the shortcut)
            "grl_alpha": 10.0,
            "domain_hidden": 64,
            "num_domains": 1,  # source domains (set by the DG protocol)
            "domain_projection": "per_domain",  # | "shared"
            "dropout": 0.1,
            "task_loss": "l1",
            # spec §5 (inferred recipe): AdamW 5e-5 adapters/experts, wd 1e-4, batch 32, 30 epochs, 10 % warm-up,
            # cosine
            "learning_rate": 5e-5, "weight_decay": 1e-4, "batch_size": 32, "epochs": 30, "warmup_ratio": 0.1,
            "lr_schedule": "cosine", "seeds": [1111, 1112, 1113],
        },
        "mosi": {},
        "mosei": {},
        "sims": {},
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        c = self.config
        self._validate_config(c)
        d = c["d_model"]
        nd = int(c["num_domains"])
        shared = c["domain_projection"] == "shared"
        self.proj_a = DomainProjection(c["audio_dim"], d, nd, shared)
        self.proj_v = DomainProjection(c["vision_dim"], d, nd, shared)

        def adapter(d_text: int) -> CrossModalAdapter:
            return CrossModalAdapter(d_text, d, c["adapter_dim"], c["adapter_heads"], dropout=c["adapter_dropout"])

        if c["use_text_features"]:
            self.text_encoder: Optional[AdaptedTextEncoder] = None
            d_text = c["text_dim"]
            self.feature_adapter: Optional[CrossModalAdapter] = adapter(d_text)
        else:
            bert = build_bert(c["bert"], add_pooling_layer=False)
            d_text = bert.config.hidden_size
            self.text_encoder = AdaptedTextEncoder(
                bert, nn.ModuleList(adapter(d_text) for _ in bert.encoder.layer), c["freeze_text_encoder"])
            self.feature_adapter = None
        self.proj_t = nn.Linear(d_text, d)
        self.modality_embedding = nn.Parameter(torch.zeros(3, d))
        self.moie = nn.ModuleList(
            MixtureOfInvariantExperts(d, c["num_experts"], c["expert_hidden"], c["routing"], c["top_k"],
                                      c["router_context"], c["expert_activation"], c["dropout"])
            for _ in range(c["moie_depth"]))
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(c["dropout"]), nn.Linear(d, 1))
        self.grl = GradientReversalLayer(c["grl_alpha"])
        # only built when its loss exists: a parameter without gradient in every step would stall DDP's reducer
        self.domain_classifier = (domain_classifier(d, c["domain_hidden"], nd)
                                  if c["invariance"] == "dann" and nd > 1 else None)

    @staticmethod
    def _validate_config(c: Mapping[str, Any]) -> None:
        for key, allowed in (("invariance", INVARIANCES), ("domain_projection", DOMAIN_PROJECTIONS),
                             ("task_loss", TASK_LOSSES)):
            if c[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {c[key]!r}")
        if int(c["num_domains"]) < 1:
            raise ValueError(f"num_domains must be >= 1, got {c['num_domains']!r}")
        if c["adapter_dim"] % c["adapter_heads"]:
            raise ValueError(f"adapter_dim ({c['adapter_dim']}) must be divisible by adapter_heads "
                             f"({c['adapter_heads']})")

    @property
    def num_domains(self) -> int:
        return int(self.config["num_domains"])

    # ------------------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        self._check_batch(batch)
        avail = batch.availability_or_ones()
        # a missing modality is masked out entirely (its tokens padding), not just zeroed
        pad_t = batch.text_padding_mask | ~avail[:, :1]
        pad_a = batch.audio_padding_mask | ~avail[:, 1:2]
        pad_v = batch.vision_padding_mask | ~avail[:, 2:3]
        audio = self.proj_a(batch.audio, batch.domain)
        vision = self.proj_v(batch.vision, batch.domain)
        sources = [(audio, pad_a), (vision, pad_v)]
        if self.text_encoder is not None:
            text = self.text_encoder(batch.text_ids, batch.text_attention_mask, batch.text_segment_ids, sources)
        else:
            text = self.feature_adapter(batch.text_features, sources, batch.text_padding_mask)
        text = text * avail[:, 0, None, None].to(text.dtype)  # missing text: zeroed after the encoder (as HME)
        emb = self.modality_embedding
        tokens = torch.cat([self.proj_t(text) + emb[0], audio + emb[1], vision + emb[2]], dim=1)
        padding = torch.cat([pad_t, pad_a, pad_v], dim=1)
        masks, spans = (pad_t, pad_a, pad_v), (pad_t.shape[1], pad_a.shape[1], pad_v.shape[1])
        out: dict[str, Tensor] = {"text": text}
        balance = tokens.new_zeros(())
        for i, layer in enumerate(self.moie):
            tokens, aux = layer(tokens, padding, modality_mean(tokens, masks, spans))
            balance = balance + aux["load_balance"]
            out[f"gates.{i}"] = aux["gates"]
        pooled = modality_mean(tokens, masks, spans)
        out.update({"M": self.head(pooled)[:, 0], "pooled": pooled, "tokens": tokens, "load_balance": balance})
        if self.domain_classifier is not None:
            out["domain_logits"] = self.domain_classifier(self.grl(pooled))
        return out

    def _check_batch(self, batch: Batch) -> None:
        self.check_batch_inputs(batch, has_text_encoder=self.text_encoder is not None)

    # ------------------------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """task + invariance_weight · invariance + load_balance_weight · load balance (top-k)."""
        c = self.config
        pred = outputs["M"]
        labels = batch.labels.to(pred.dtype)
        l_task = task_loss(pred, labels, c["task_loss"])
        kind, nd = c["invariance"], self.num_domains
        if kind == "dann" and self.domain_classifier is not None:
            l_inv = dann_loss(outputs["domain_logits"], batch.domain, nd)
        elif kind == "vrex":
            l_inv = vrex_penalty(pred, labels, batch.domain, nd, c["task_loss"])
        elif kind == "irm":
            l_inv = irm_penalty(pred, labels, batch.domain, nd, c["task_loss"])
        else:
            l_inv = pred.new_zeros(())
        l_lb = outputs["load_balance"] if c["routing"] == "topk" else pred.new_zeros(())
        total = l_task + c["invariance_weight"] * l_inv + c["load_balance_weight"] * l_lb
        return {"loss": total, "l_task": l_task, "l_inv": l_inv, "l_lb": l_lb}

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters only (the frozen text encoder is left out of the optimizer)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]
