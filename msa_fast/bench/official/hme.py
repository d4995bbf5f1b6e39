"""HME's official side (YetZzzzzz/HME, ``HME_MSA/``).

Model: ``HME(BertConfig(**bert, num_labels=1), args=args)`` (in place of ``HME.from_pretrained('./BERT_en/')``)
with ``args`` = ``HME_main.py``'s argparse values for the README MOSI command (``--dataset=mosi
--learning_rate=2e-5 --d_l=192 --missing_rate=0.2 --layers=4 --hyper_depth=3 --latent_layers=4 --latent_dim=192
--n_epochs=100``; :data:`HME_MOSI_ARGS`). ``HME_main.py`` itself is not imported (it parses ``sys.argv`` and
needs ``transformers.optimization.AdamW`` at import).
Step (``train_epoch``, one batch): ``model(input_ids, visual, acoustic, ps, token_type_ids, attention_mask)`` —
BERT, MulT encoders, the in-batch retrieval loop (``get_similar_embeddings``), Perceivers, VIB (sampled) —; loss =
L1(pred) + 0.8·mean of the 3 unimodal L1 + 0.01·info_losses; ``zero_grad``; ``backward``;
``clip_grad_value_(…, 0.8)``; ``optimizer.step()``; ``loss.item()``. Optimizer: ``transformers.optimization.AdamW``
(eps 1e-8, weight decay 1e-4, none on ``bias`` / ``LayerNorm.weight``) where that transformers has it, else
``torch.optim.AdamW(foreach=False)`` — the same per-parameter loop (transformers' applies the decoupled decay after
the Adam update instead of before: same cost).
transformers ≥ 5 compatibility (as for the parity fixtures): ``BERT_TM`` gets back transformers-4.30's
``get_extended_attention_mask`` ((1 − mask)·finfo.min) and ``get_head_mask`` (None per layer).
``features`` variant: ``BERT_TM`` is replaced by a pass-through while the model is built, and ``input_ids``
carries the precomputed (B, L, 768) features (the official forward reads ``input_ids`` only through ``bert``).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping, Optional
from unittest import mock

import torch
from torch import Tensor, nn

from .common import OfficialAdapter, PassThrough, isolated_import_path, no_decay_groups, require_modules

#: ``HME_MSA/HME_main.py``'s namespace for the README MOSI command (argparse defaults + the MOSI block).
HME_MOSI_ARGS: dict[str, Any] = {
    "f": "", "dataset": "mosi", "max_seq_length": 50, "train_batch_size": 256, "dev_batch_size": 128,
    "test_batch_size": 128, "n_epochs": 100, "out_dropout": 0.1, "dropout": 0.1, "similarity_threshold": 0.6,
    "model": "bert-base-uncased", "learning_rate": 2e-05, "gradient_accumulation_step": 1, "d_l": 192, "seed": 5576,
    "missing_rate": 0.2, "attn_dropout": 0.5, "num_heads": 16, "relu_dropout": 0.3, "res_dropout": 0.3,
    "attn_dropout_v": 0.0, "embed_dropout": 0.2, "weight_decay": 0.0001, "schedule": [180, 200],
    "adam_epsilon": 1e-08, "load": 0, "test": 0, "model_path": "bert_tm.pth", "cos": False, "alignment": "align",
    "layers": 4, "hyper_depth": 3, "latent_layers": 4, "num_latents": 5, "latent_dim": 192,
    "save_path": "./output/models/", "uncertainty_LB": 0.2, "uncertainty_UB": 1.0, "weights_threshold": 0.2,
    "clip": 0.8, "lr_decrease": "cos", "lr_warmup": 1, "TEXT_DIM": 768, "ACOUSTIC_DIM": 5, "VISUAL_DIM": 20,
    "train_nums": 1284, "dev_nums": 229, "test_nums": 686, "attn_dropout_a": 0.2, "text_length": 50,
    "visual_length": 50, "acoustic_length": 50, "output_dim": 1,
}


def hme_inputs(batch, features: bool = False) -> dict[str, Any]:
    """Our word-aligned batch → the tensors ``train_epoch`` hands the official forward (names as there); ``ps``
    (B, 3) int32 availability (text, audio, vision) from ``batch.availability`` (all ones when absent)."""
    if features and batch.text_features is None:
        raise ValueError("the features variant needs batch.text_features")
    n = batch.batch_size
    return {"input_ids": batch.text_features if features else batch.text_ids, "visual": batch.vision,
            "acoustic": batch.audio, "input_mask": batch.text_attention_mask, "segment_ids": batch.text_segment_ids,
            "label_ids": batch.labels.float().reshape(n, 1, 1),
            "ps": batch.availability_or_ones().to(torch.int32)}


def _extended_attention_mask(self, attention_mask: Tensor, input_shape, device=None, dtype=None) -> Tensor:
    """transformers-4.30 ``ModuleUtilsMixin.get_extended_attention_mask`` for an encoder: (B, L) → (B, 1, 1, L)
    additive, (1 − mask)·finfo(dtype).min."""
    dtype = dtype or next(self.parameters()).dtype
    if attention_mask.dim() == 3:
        ext = attention_mask[:, None, :, :]
    else:
        ext = attention_mask[:, None, None, :]
    ext = ext.to(dtype=dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def _head_mask(self, head_mask, num_hidden_layers: int, is_attention_chunked: bool = False):
    """transformers-4.30 ``get_head_mask`` without a head mask: None per layer."""
    if head_mask is not None:
        raise ValueError("head_mask: the official HME step passes none; this stand-in supports only None")
    return [None] * num_hidden_layers


def _init_weights_via_post_init(self) -> None:
    """``init_weights()`` as the official constructors call it (transformers 4.30), on transformers >= 5, whose
    ``init_weights`` needs the state ``post_init()`` sets up: run ``post_init()`` (which calls back here, then
    the library's own ``init_weights``)."""
    from transformers.modeling_utils import PreTrainedModel

    if self.__dict__.get("_msa_fast_in_post_init"):
        PreTrainedModel.init_weights(self)
        return
    self.__dict__["_msa_fast_in_post_init"] = True
    try:
        self.post_init()
    finally:
        del self.__dict__["_msa_fast_in_post_init"]


class HMEAdapter(OfficialAdapter):
    method = "hme"
    repo = "YetZzzzzz/HME"
    commit = "6f0c9a7adeff47304a4a0337c366283c9a4bf221"
    code_subdir = "HME_MSA"
    marker = "HME_model.py"
    top_level = ("HME_model", "model_utils", "utils", "modules", "eval_metrics", "HME_main")
    needs = {"einops": "einops", "sklearn": "scikit-learn"}
    step_note = ("forward (BERT, MulT, in-batch retrieval loop, Perceivers, sampled VIB), L1 + 0.8 mean unimodal L1 "
                 "+ 0.01 KL, zero_grad, backward, clip_grad_value_ 0.8, AdamW step, loss.item()")

    def build(self, bert_config: Mapping[str, Any], features: bool, seed: int) -> nn.Module:
        from transformers import BertConfig

        require_modules(self.method, self.needs)
        self.args = SimpleNamespace(**HME_MOSI_ARGS)
        with isolated_import_path(self.code_dir, self.top_level):
            import HME_model
            import model_utils

            self.model_utils = model_utils
            bert_cls = HME_model.BERT_TM
            if not hasattr(bert_cls, "get_head_mask"):  # transformers >= 5
                bert_cls.get_extended_attention_mask = _extended_attention_mask
                bert_cls.get_head_mask = _head_mask
                for cls in (bert_cls, HME_model.HME):
                    cls.init_weights = _init_weights_via_post_init
                self.notes.append("transformers>=5: BERT_TM gets transformers-4.30's get_extended_attention_mask / "
                                  "get_head_mask back; init_weights() runs post_init() first")
            torch.manual_seed(seed)
            config = BertConfig(**dict(bert_config), num_labels=1)
            if features:
                with mock.patch.object(HME_model, "BERT_TM", lambda *a, **k: PassThrough()):
                    model = HME_model.HME(config, args=self.args)
            else:
                model = HME_model.HME(config, args=self.args)
        return model.to(self.device)

    def inputs(self, batch, features: bool, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        return hme_inputs(batch, features)

    def _forward(self, model: nn.Module, x: Mapping[str, Any]) -> dict[str, Tensor]:
        return model(x["input_ids"], x["visual"], x["acoustic"], x["ps"], token_type_ids=x["segment_ids"],
                     attention_mask=x["input_mask"], labels=None)

    def predict(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        """Eval forward on the deterministic path: the official VIB samples μ + ε·σ even in eval mode; here the
        sample is μ (as msa_fast's eval and the parity fixture)."""
        model.eval()
        vib = self.model_utils.VIB_estimate
        with torch.no_grad(), mock.patch.object(vib, "reparametrize_n", lambda _self, mu, std, n=1: mu):
            out = model.test(inputs["input_ids"], inputs["visual"], inputs["acoustic"], inputs["ps"],
                             token_type_ids=inputs["segment_ids"], attention_mask=inputs["input_mask"])
        return out["predictions"].reshape(-1)

    def _optimizer(self, groups, lr: float, eps: float):
        try:
            from transformers.optimization import AdamW  # transformers < 5 (the official 4.30.2)
        except ImportError:
            self.optimizer_note = ("torch.optim.AdamW(foreach=False) standing in for transformers.optimization.AdamW "
                                   "(gone in this transformers): lr 2e-5, eps 1e-8, weight decay 1e-4, none on "
                                   "bias / LayerNorm.weight")
            return torch.optim.AdamW(groups, lr=lr, eps=eps, foreach=False)
        self.optimizer_note = ("transformers.optimization.AdamW(lr 2e-5, eps 1e-8, weight decay 1e-4, none on bias / "
                               "LayerNorm.weight)")
        return AdamW(groups, lr=lr, eps=eps)

    def make_step(self, model: nn.Module, inputs: Mapping[str, Any]):
        from torch.nn import L1Loss

        a = self.args
        optimizer = self._optimizer(no_decay_groups(model, a.weight_decay), a.learning_rate, a.adam_epsilon)
        x = dict(inputs)
        label_ids = x["label_ids"]
        model.train()

        def step():
            outputs = self._forward(model, x)
            loss_fct = L1Loss()
            loss_task = loss_fct(outputs["predictions"].view(-1), label_ids.view(-1))
            loss_fc = (loss_fct(outputs["logits_l_p"].view(-1), label_ids.view(-1))
                       + loss_fct(outputs["logits_a_p"].view(-1), label_ids.view(-1))
                       + loss_fct(outputs["logits_v_p"].view(-1), label_ids.view(-1))) / 3.0
            loss_all = loss_task + 0.8 * loss_fc + 0.01 * outputs["info_losses"]
            optimizer.zero_grad()
            loss_all.backward()
            torch.nn.utils.clip_grad_value_([p for p in model.parameters() if p.requires_grad], a.clip)
            optimizer.step()
            return loss_all.item()

        return step
