"""DashFusion's official side (ultramarineX/DashFusion, ``src/``).

Model: ``DashFusion(config=config)`` with ``src/config.py`` set to ``dataset = "mosi"`` (the file ships ``"sims"``;
``PARAM`` takes the same branch for both) and ``set_train([True] * 5)``, as ``src/train.py`` builds it.
Step (``train.py::DashFusion_train``, one batch): ``optimizer.zero_grad()``; ``model(sample1, sample2,
return_loss=True)`` — the anchors and the 6·B partners (``sample2``, [ss, ss, dd, dd, sd, sd] per anchor) each go
through BERT, both encoders and the temporal alignment; loss = MSE + 0.2 · NT-Xent (``cont_NTXentLoss``, a
pytorch-metric-learning 0.9.99 subclass) —; ``backward``; ``torch.optim.AdamW`` (lr 5e-5, weight decay 1e-3
except ``bias`` / ``LayerNorm.weight``); ``scheduler.step()`` (linear warm-up schedule, per batch). No clipping.
Partners: the rows our model drew (``draw_partners`` of its pools over this batch, the "train split"), so both
sides encode the same 7B samples; the official loader's ``sample()`` is not called (data loading, not the step).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from .common import (FeaturesAsBert, OfficialAdapter, RowTokenizer, frame_padding_mask, isolated_import_path,
                     no_decay_groups, patched_from_pretrained, require_modules, row_texts)

#: MOSI: train split size (the scheduler's length), batch 16, epochs / warm-up epochs as in src/config.py.
MOSI_TRAIN_ROWS = 1284


def dashfusion_sample(batch, texts: list[str]) -> dict[str, Any]:
    """One official loader sample dict (``sample1`` / ``sample2``) for ``batch``; ``texts`` = the rows' texts."""
    return {"raw_text": list(texts), "audio": batch.audio, "vision": batch.vision,
            "audio_padding_mask": frame_padding_mask(batch.audio_lengths, batch.audio.shape[1]),
            "vision_padding_mask": frame_padding_mask(batch.vision_lengths, batch.vision.shape[1]),
            "regression_labels": batch.labels.float(), "index": batch.index, "id": list(batch.ids),
            "audio_lengths": batch.audio_lengths, "vision_lengths": batch.vision_lengths}


def dashfusion_inputs(batch, features: bool = False, partner_rows: Optional[Tensor] = None) -> dict[str, Any]:
    """Our batch → what the official forward receives: ``sample1`` (and ``sample2``, the partners, when
    ``partner_rows`` (6B,) positions in ``batch`` are given) plus the :class:`RowTokenizer` that turns their
    ``raw_text`` into exactly our token ids (and features, ``features=True``)."""
    texts, table = row_texts(batch, features=features)
    out: dict[str, Any] = {"sample1": dashfusion_sample(batch, texts), "sample2": None,
                           "tokenizer": RowTokenizer(table)}
    if partner_rows is not None:
        from ...data.dataset import select_rows

        rows = torch.as_tensor(partner_rows, dtype=torch.long).cpu()
        partners = select_rows(batch, rows)
        out["sample2"] = dashfusion_sample(partners, [texts[int(r)] for r in rows])
    return out


class DashFusionAdapter(OfficialAdapter):
    method = "dashfusion"
    repo = "ultramarineX/DashFusion"
    commit = "37ba4177ba4be7db6ef2a8ae0ce916f2d6f99426"
    code_subdir = "src"
    marker = "model/dashfusion.py"
    top_level = ("config", "utils", "model", "dataloader", "train", "main")
    needs = {"einops": "einops", "sklearn": "scikit-learn", "scipy": "scipy",
             "pytorch_metric_learning": "pytorch-metric-learning==0.9.99"}
    optimizer_note = ("torch.optim.AdamW(lr 5e-5; weight decay 1e-3, none on bias / LayerNorm.weight) + "
                      "get_linear_schedule_with_warmup stepped per batch (as train.py)")
    step_note = ("anchors + 6B partners through BERT/encoders/TA, MSE + 0.2*NT-Xent, backward, AdamW step, "
                 "scheduler step; no clipping")

    def build(self, bert_config: Mapping[str, Any], features: bool, seed: int) -> nn.Module:
        require_modules(self.method, self.needs)
        with isolated_import_path(self.code_dir, self.top_level):
            import config as official_config  # noqa: the official src/config.py
            from model.dashfusion import DashFusion

            official_config.dataset = "mosi"
            official_config.DEVICE = self.device
            self.config = official_config
            torch.manual_seed(seed)
            with patched_from_pretrained(bert_config, features):
                model = DashFusion(config=official_config)
        model.set_train([True, True, True, True, True])
        if features and not isinstance(model.text_encoder.extractor, FeaturesAsBert):
            raise RuntimeError("DashFusion's text encoder was not replaced by the features stand-in")
        return model.to(self.device)

    def step_extras(self, ours: nn.Module, batch) -> dict[str, Any]:
        from ...models.dashfusion.partners import draw_partners

        if getattr(ours, "partner_pools", None) is None:
            raise RuntimeError("our DashFusion has no partner pools (prepare_epoch was not called)")
        rows = draw_partners(ours.partner_pools, batch.index, ours.partner_draw_seed)
        # train rows → positions in this batch (the batch is the whole "train split" of the benchmark)
        position = {int(r): i for i, r in enumerate(batch.index.tolist())}
        return {"partner_rows": torch.tensor([position[int(r)] for r in rows], dtype=torch.long)}

    def inputs(self, batch, features: bool, extra: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        rows = (extra or {}).get("partner_rows")
        return dashfusion_inputs(batch, features, rows)

    def _install(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        model.text_encoder.tokenizer = inputs["tokenizer"]

    def predict(self, model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
        self._install(model, inputs)
        model.eval()
        with torch.no_grad():
            pred, *_ = model(inputs["sample1"], None, return_loss=True, device=self.device)
        return pred.reshape(-1)

    def make_step(self, model: nn.Module, inputs: Mapping[str, Any]):
        from transformers.optimization import get_linear_schedule_with_warmup

        if inputs.get("sample2") is None:
            raise ValueError("the DashFusion step needs the partner samples (sample2)")
        self._install(model, inputs)
        train = self.config.PARAM.Train
        optimizer = torch.optim.AdamW(params=no_decay_groups(model, train.decay), lr=train.lr, amsgrad=False)
        steps = -(-MOSI_TRAIN_ROWS // train.batch_size)
        scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=int(train.num_warm_up * steps),
                                                    num_training_steps=train.epoch * steps)
        sample1, sample2 = inputs["sample1"], inputs["sample2"]
        model.train()

        def step():
            optimizer.zero_grad()
            _pred, all_loss, _loss, _const = model(sample1, sample2, return_loss=True, device=self.device)
            all_loss.backward()
            optimizer.step()
            scheduler.step()

        return step
