"""DashFusion (Wen et al., IEEE TNNLS 2025): dual-stream alignment with hierarchical bottleneck fusion.

Official code: ultramarineX/DashFusion @ 37ba4177 (spec: shared/specs/method_dashfusion.md). Pipeline:
BERT → projector (t, t̄); audio / vision transformer encoders with a [CLS] slot (a, ā; v, v̄); temporal alignment
H = t + TA(t; a, v); hierarchical bottleneck fusion over (H, t, a, v) → classifier. Training adds 0.2 · NT-Xent
over each anchor's 6 retrieved partners (anchors + 6·B partners all go through the encoders: 7B samples per step).

Architecture quirks kept (parity): bottleneck tokens = the first 8 rows of H (no learned tokens); HBF attention
with biased q/k/v, no output projection, scale 128^-½, LayerNorm on the sub-layer output before the residual;
Multi_CA and TA = one softmax per source, outputs summed, **no frame padding masks** (padded frames and the zeroed
padded rows take part; the frame count is fixed, so this does not depend on the batch); encoder dropout 0.5; [CLS] ones-init; zero-init fixed-length position
embeddings (inputs must have exactly ``audio_len`` / ``vision_len`` frames); official HBF call swaps audio and
vision (its ``encoder_a`` weights see vision — handled by ``load_official_state_dict``; the fused vector keeps the
official order cat(bottleneck, text, vision, audio)).

Text input: the official model tokenises ``raw_text`` inside ``forward`` and pads to the longest sample of the
batch. Here the ids come from ``Batch.text_ids`` (MMSA ``text_bert``; ``use_text_features=True`` reads
``Batch.text_features`` instead of running BERT) and every batch is cropped to L = its longest text, the official
L exactly (the parity fixture's ``tokenized`` equals ``text_bert[:, :, :L]``). Deviation: MMSA ids are truncated at
50 (SIMS 39) tokens, the official tokenizer at 128.

Pipeline bugs fixed by default, official behaviour behind a flag:
- ``unmasked_text_padding`` (False): the official HBF has no text padding mask, so the padding up to the longest
  text *of the batch* takes part as keys (level-0 self-attention over H, the Multi_CA gather from the text, and —
  for texts shorter than 8 tokens — padded bottleneck rows in the bottleneck self-attention and the exchange):
  a sample's prediction depends on which samples share its batch, and evaluation metrics change with the eval batch
  size (or order). The default masks those keys (rows ≥ max(1, text length)), which gives every sample exactly what
  the official model gives it alone (a batch of one: text cropped to its own length), whatever the batch. Training
  uses the same rule. True = the official unmasked fusion (the parity fixture's batch-of-8 outputs).
- ``rank_index_bug`` (False): the official partner pools hold rank positions used as sample indices
  (inherited from ConFEDE); the default uses the retrieved sample indices, self excluded.
- ``mask_zero_frames`` (False): padding masks from ``*_lengths``; True = the official loader rule (frames whose
  features sum to exactly 0, frame 0 forced valid).
- Partner draw: counter-based keys from (``partner_seed``, epoch, anchor row) instead of Python's global ``random``
  (independent of the batch's other samples: data-parallel ranks draw what one process draws).
- ``epochs`` must be given (the official file's 4 / 25 / 4 contradict its own comments 100 / 125 / 100 and, with
  10 warm-up epochs, never reach the peak LR; kept as ``official_epochs_in_file``).
Frozen BERT (not official; the official model fine-tunes BERT): ``freeze_bert=True`` freezes BERT (no gradient, eval
mode, out of the optimizer) and ``bert_feature_cache`` (default True) serves its features from a per-sample cache
(``msa_fast.nn.text_cache``: options, key, exactness, memory). ``frozen_bert_width``: ``"padded"`` (default) runs the
frozen BERT on the full padded width of the batch (MMSA: 50) and crops to the batch's longest text afterwards — a
sample's features then do not depend on the other samples of its batch, and each sample goes through BERT once;
``"batch"`` runs it on the crop as the fine-tuned model does (cache entries then hit only at the same crop width).
The two differ by float rounding (~1e-6) at the valid positions. ``freeze_bert`` needs ``use_text_features=False``.

Omitted because they compute nothing: the unused official modules (``fc``, ``dense``, ``cls_embedding``, TA
``ffn/norm1/norm2``, BERT pooler, the projector's discarded dropout); their official keys are still required
(shape-checked, then ignored) by ``load_official_state_dict``.

Exact savings (``prune_rows=True``, tested for equality): the HBF bottleneck self-attention computes only its
kept query rows (8, then 4, …; keys are still all rows), and the last level updates only token 0 of each
modality (the only rows read). Anchors and partners share one encoder pass (text cropped back per group).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.batch import Batch
from ...data.dataset import SplitRows, concat_batches
from ...distributed import encode_batches_sharded
from ...nn.text_cache import FREEZE_DEFAULTS, freeze_module, freeze_options, frozen_text_features, sample_keys
from ...nn.text_encoder import build_bert
from ...ops import masked_mean
from ..base import MSAModel, no_decay_param_groups
from .layers import FrameEncoder, HierarchicalBottleneckFusion, TemporalAlignment, TextProjector
from .partners import draw_partners, partner_ntxent_loss, retrieval_labels, retrieve_partner_pools
from ..registry import register

#: Output keys whose dim 1 is the text length (cropped back to the anchors' L after a joint anchor+partner pass).
TEXT_SEQ_KEYS = ("bert.last_hidden_state", "text_encoder.all", "text_encoder.valid", "temporal_alignment.H")
FROZEN_BERT_WIDTHS = ("padded", "batch")


@register("dashfusion")
class DashFusion(MSAModel):
    """``forward(batch) -> {"M": (B,), intermediates}``; ``training_step`` adds the partner contrastive term."""

    cross_sample_training = True  # the objective mixes samples of a batch (see msa_fast.train.dist)
    # ... without needing a gather: each anchor's partners are drawn from (seed, epoch, anchor) and its NT-Xent is
    # over its own group of 7; the per-epoch pools come from encode_split (sharded and gathered across ranks)
    gathers_global_batch = True
    TINY_CONFIG = {"use_text_features": True, "d_model": 32, "encoder_ff_dim": 64, "fusion_ff_dim": 64,
                   "contrastive_weight": 0.0, "warmup_epochs": 0}
    CONFIGS: dict[str, dict[str, Any]] = {
        "common": {
            "bert": "bert-base-uncased",
            "use_text_features": False,
            **FREEZE_DEFAULTS,  # freeze_bert, bert_feature_cache(_max_entries): msa_fast.nn.text_cache
            "frozen_bert_width": "padded",  # "padded" | "batch" (read only with freeze_bert; module docstring)
            "d_model": 128,
            "encoder_heads": 8,
            "encoder_ff_dim": 256,
            "encoder_dropout": 0.5,  # AudioEncoder/VisionEncoder constructor default (the config value is unused)
            "input_dropout": 0.1,  # a/v_drop_out: dropout after the position embeddings
            "ta_heads": 8,
            "ta_dim_head": 32,
            "fusion_heads": 8,
            "fusion_ff_dim": 256,
            "fusion_dropout": 0.0,  # PARAM.downStream.drop_out (TA output, HBF FFNs)
            "n_bottleneck": 8,
            "contrastive_weight": 0.2,
            "temperature": 0.5,  # heat
            "partner_pool_size": 10,
            "partner_seed": None,  # None: torch.initial_seed() at construction (the run seed set before build)
            "rank_index_bug": False,
            "round_partner_labels": True,  # np.round(labels) → 7 classes (MOSI/MOSEI)
            "partner_window_top": 1.0,  # fraction of the ranking scanned for ss/sd (MOSI: all)
            "partner_window_bottom": 1.0,  # fraction scanned from the bottom for dd
            "mask_zero_frames": False,
            "unmasked_text_padding": False,  # True: official, batch-dependent (see the module docstring)
            "prune_rows": True,
            "batch_size": 16,
            "lr": 5e-5,  # AdamW, one lr for everything (BERT fully fine-tuned)
            "weight_decay": 1e-3,  # not on names containing 'bias' / 'LayerNorm.weight' (official names)
            "epochs": None,  # required: see the module docstring
            "warmup_epochs": 10,  # linear warm-up then linear decay, stepped per batch
            "lr_schedule": "linear",  # get_linear_schedule_with_warmup
            "early_stop": 10_000,  # official: none (every epoch runs)
            "official_epochs_in_file": 4,
            "checkpoint_metric": "MAE",  # validation MAE, ties save, from epoch 2 on
            "seeds": [12],
        },
        "mosi": {"audio_layers": 2, "vision_layers": 2, "fusion_depth": 2},
        "mosei": {"audio_layers": 4, "vision_layers": 4, "fusion_depth": 3, "batch_size": 8, "lr": 2e-5,
                  "warmup_epochs": 1, "official_epochs_in_file": 25, "partner_window_top": 1 / 2,
                  "partner_window_bottom": 1 / 8},
        "sims": {"audio_layers": 2, "vision_layers": 2, "fusion_depth": 2, "bert": "bert-base-chinese",
                 "round_partner_labels": False, "partner_window_top": 1 / 1.6, "partner_window_bottom": 1 / 2},
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        c = self.config
        d = c["d_model"]
        self.bert: Optional[nn.Module] = None
        if not c["use_text_features"]:
            self.bert = build_bert(c["bert"], add_pooling_layer=False)
            if self.bert.config.hidden_size != c["text_dim"]:
                raise ValueError(f"bert hidden_size {self.bert.config.hidden_size} != text_dim {c['text_dim']}")
        self.freeze_bert, self.bert_cache = freeze_options(c, self.bert is not None)  # cache: plain attribute
        if c.get("frozen_bert_width", "padded") not in FROZEN_BERT_WIDTHS:
            raise ValueError(f"frozen_bert_width must be one of {FROZEN_BERT_WIDTHS}, got {c['frozen_bert_width']!r}")
        if self.freeze_bert:
            freeze_module(self.bert)
        self.text_projector = TextProjector(c["text_dim"], d)
        enc = dict(d_model=d, heads=c["encoder_heads"], ff_dim=c["encoder_ff_dim"], dropout=c["encoder_dropout"],
                   input_dropout=c["input_dropout"])
        self.audio_encoder = FrameEncoder(c["audio_dim"], c["audio_len"], n_layers=c["audio_layers"], **enc)
        self.vision_encoder = FrameEncoder(c["vision_dim"], c["vision_len"], n_layers=c["vision_layers"], **enc)
        self.temporal_alignment = TemporalAlignment(d, c["ta_heads"], c["ta_dim_head"], c["fusion_dropout"])
        self.hbf = HierarchicalBottleneckFusion(d, c["fusion_heads"], c["fusion_ff_dim"], c["fusion_dropout"],
                                                c["fusion_depth"], c["n_bottleneck"])
        self.classifier = nn.Sequential(nn.Linear(4 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.GELU(),
                                        nn.Linear(d, 1))
        if c["partner_seed"] is None:
            c["partner_seed"] = torch.initial_seed() % 2**63
        self.partner_draw_seed = int(c["partner_seed"])  # of the current epoch (prepare_epoch)
        self.partner_pools: Optional[dict[str, Tensor]] = None  # {"ss","dd","sd"}: (N, k) train rows
        self._train_split: Optional[SplitRows] = None


    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Batch → {"M": (B,), "text_encoder.all": (B, L, d), …, "hbf.fused": (B, 4d), "classifier": (B, 1)}."""
        out = self.encode(batch)
        out.update(self.fuse(out))
        return out

    def encode(self, batch: Batch, align: bool = True) -> dict[str, Tensor]:
        """Unimodal encoders (+ temporal alignment when ``align``); text cropped to the batch's longest text."""
        out: dict[str, Tensor] = {}
        text_len = max(1, int(batch.text_lengths.max())) if batch.batch_size else 1
        valid_t = batch.text_attention_mask[:, :text_len].bool()
        if self.freeze_bert:
            width = batch.text_ids.shape[1] if self.config["frozen_bert_width"] == "padded" else text_len
            feats = frozen_text_features(self.bert, batch.text_ids[:, :width], batch.text_attention_mask[:, :width],
                                         batch.text_segment_ids[:, :width], sample_keys(batch),
                                         self.bert_cache)[:, :text_len]
            out["bert.last_hidden_state"] = feats
        elif self.bert is not None:
            feats = self.bert(input_ids=batch.text_ids[:, :text_len],
                              attention_mask=batch.text_attention_mask[:, :text_len],
                              token_type_ids=batch.text_segment_ids[:, :text_len]).last_hidden_state
            out["bert.last_hidden_state"] = feats
        else:
            if batch.text_features is None:
                raise ValueError("use_text_features=True needs batch.text_features (B, L_t, text_dim), got None")
            feats = batch.text_features[:, :text_len]
        t_all = self.text_projector(feats) * valid_t.unsqueeze(-1).to(feats.dtype)
        out["text_encoder.valid"] = valid_t
        out["text_encoder.all"] = t_all
        out["text_encoder.mean"] = masked_mean(t_all, valid_t)
        for name, enc, frames, lengths in (("audio", self.audio_encoder, batch.audio, batch.audio_lengths),
                                           ("vision", self.vision_encoder, batch.vision, batch.vision_lengths)):
            self._check_frames(name, frames, enc)
            mask = self._frame_padding_mask(frames, lengths)
            out[f"{name}_encoder.all"], out[f"{name}_encoder.mean"] = enc(frames, mask)
        if align:
            out["temporal_alignment.H"] = self.temporal_alignment(out["text_encoder.all"], out["audio_encoder.all"],
                                                                  out["vision_encoder.all"])
        return out

    def fuse(self, enc: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """HBF + classifier on ``encode``'s outputs → {"hbf.*", "classifier": (B, 1), "M": (B,)}.

        Text rows at or beyond a sample's text length (``text_encoder.valid``) are not keys in HBF unless
        ``unmasked_text_padding`` (official): see the module docstring."""
        lengths = None if self.config["unmasked_text_padding"] else enc["text_encoder.valid"].sum(dim=1)
        out = self.hbf(enc["temporal_alignment.H"], enc["text_encoder.all"], enc["audio_encoder.all"],
                       enc["vision_encoder.all"], prune_rows=self.config["prune_rows"], text_lengths=lengths)
        out["classifier"] = self.classifier(out["hbf.fused"])
        out["M"] = out["classifier"].squeeze(-1)
        return out

    def _check_frames(self, name: str, frames: Tensor, enc: FrameEncoder) -> None:
        expected = (enc.n_frames, enc.input_dim)
        if frames.dim() != 3 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"batch.{name} must be (B, {expected[0]}, {expected[1]}) (DashFusion's position "
                             f"embeddings have a fixed length), got {tuple(frames.shape)}")

    def _frame_padding_mask(self, frames: Tensor, lengths: Tensor) -> Tensor:
        """(B, L) frames → (B, L + 1) bool True = padding; column 0 ([CLS]) copies frame 0, which is never padding."""
        if self.config["mask_zero_frames"]:
            pad = frames.sum(dim=-1) == 0
        else:
            pad = torch.arange(frames.shape[1], device=frames.device)[None] >= lengths.to(frames.device)[:, None]
        pad[:, 0] = False
        return torch.cat([pad[:, :1], pad], dim=1)

    # ------------------------------------------------------------------------------------------------------------
    # objective
    # ------------------------------------------------------------------------------------------------------------
    def loss(self, batch: Batch, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """MSE(M, y) + w · NT-Xent over partners (only when ``outputs`` has "contrastive.features")."""
        pred = outputs["M"]
        mse = F.mse_loss(pred, batch.labels.to(pred.dtype))
        feats = outputs.get("contrastive.features")
        con = partner_ntxent_loss(feats, self.config["temperature"]) if feats is not None else mse.new_zeros(())
        return {"loss": mse + self.config["contrastive_weight"] * con, "pred_loss_mse": mse, "const_loss": con}

    def training_step(self, batch: Batch) -> dict[str, Tensor]:
        """Anchors + 6 drawn partners each, all through the encoders and TA in one pass (7B samples)."""
        if self.config["contrastive_weight"] == 0:
            return super().training_step(batch)
        if self.partner_pools is None or self._train_split is None:
            raise RuntimeError("DashFusion.training_step needs partner pools: call prepare_epoch(epoch, train_data) "
                               "first (or set contrastive_weight=0)")
        b = batch.batch_size
        rows = draw_partners(self.partner_pools, batch.index, self.partner_draw_seed)
        partners = self._train_split.rows(rows).to(batch.labels.device)
        joint = self.encode(concat_batches([batch, partners]))
        anchor_len = max(1, int(batch.text_lengths.max()))
        anchors = {k: (v[:b, :anchor_len] if k in TEXT_SEQ_KEYS else v[:b]) for k, v in joint.items()}
        out = dict(anchors)
        out.update(self.fuse(anchors))
        pooled = torch.stack([joint["text_encoder.mean"], joint["vision_encoder.mean"], joint["audio_encoder.mean"],
                              joint["temporal_alignment.H"][:, 0]], dim=1)  # (7B, 4, d) official row families
        group = torch.cat([pooled[:b, None], pooled[b:].view(b, 6, 4, -1)], dim=1)  # (B, 7, 4, d)
        out["contrastive.features"] = group.transpose(1, 2)  # (B, 4, 7, d)
        losses = self.loss(batch, out)
        losses["M"] = out["M"].detach()
        return losses

    def prepare_epoch(self, epoch: int, train_data: Any) -> None:
        """Official ``update_matrix``: on odd (1-based) epochs — and whenever no pools exist yet — re-encode the
        train split (eval mode, no grad) into pooled (t̄, v̄, ā) and rebuild the partner pools; reseed the draw.

        ``train_data``: the train split as a ``Batch``, an ``MMSADataset`` or a DataLoader over one, or any iterable
        of ``Batch`` covering it (see ``msa_fast.data.dataset.SplitRows``).
        """
        if self.config["contrastive_weight"] == 0:
            return
        self._train_split = SplitRows(train_data)
        if epoch % 2 == 1 or self.partner_pools is None:
            feats, labels = self.encode_split(self._train_split)
            c = self.config
            self.partner_pools = retrieve_partner_pools(
                feats, retrieval_labels(labels, c["round_partner_labels"]), k=c["partner_pool_size"],
                rank_index_bug=c["rank_index_bug"], window_top=c["partner_window_top"],
                window_bottom=c["partner_window_bottom"])
        self.partner_draw_seed = (int(self.config["partner_seed"]) * 100_003 + int(epoch)) % 2**63

    def epoch_state(self) -> dict[str, Any]:
        """The partner pools: built on odd epochs from the model of that moment, used again on the next (even)
        epoch, so a run resumed after an odd epoch needs them (rebuilding would use later weights)."""
        return {} if self.partner_pools is None else {"partner_pools": dict(self.partner_pools)}

    def load_epoch_state(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - {"partner_pools"}
        if unknown:
            raise ValueError(f"DashFusion epoch state has unknown keys {sorted(unknown)}")
        pools = state.get("partner_pools")
        self.partner_pools = None if pools is None else {k: v.clone() for k, v in pools.items()}

    @torch.no_grad()
    def encode_split(self, split: SplitRows, batch_size: int = 128) -> tuple[Tensor, Tensor]:
        """Pooled features (N, 3d) = cat(t̄, v̄, ā) (official order, eval mode, batches of 128) and labels (N,), on
        the CPU. Under ``torch.distributed`` the batches are dealt to the ranks and gathered (same result, 1/world
        of the work per rank): every rank must call it (the trainer's ``prepare_epoch`` does)."""
        was_training = self.training
        self.eval()

        def encode(rows: range) -> dict[str, Tensor]:
            b = split.rows(torch.arange(rows.start, rows.stop)).to(self.device)
            enc = self.encode(b, align=False)
            return {"feats": torch.cat([enc["text_encoder.mean"], enc["vision_encoder.mean"],
                                        enc["audio_encoder.mean"]], dim=-1), "labels": b.labels}
        try:
            out = encode_batches_sharded(len(split), batch_size, encode)
        finally:
            self.train(was_training)
        return out["feats"].cpu(), out["labels"].cpu()

    # ------------------------------------------------------------------------------------------------------------
    # official weights
    # ------------------------------------------------------------------------------------------------------------
    def official_key_map(self) -> dict[str, str]:
        """Our state_dict key → the official key of the same tensor."""
        return {k: _to_official_key(k) for k in self.state_dict()}

    def official_unused_shapes(self) -> dict[str, tuple[int, ...]]:
        """Official keys with no counterpart here (unused modules, aliases, BERT pooler) and their shapes."""
        c, d = self.config, self.config["d_model"]
        shapes: dict[str, tuple[int, ...]] = {
            "text_encoder.projector.MLP.0.weight": (d, c["text_dim"]),  # aliases of projector.proj.{0,2}
            "text_encoder.projector.MLP.2.weight": (d, d),
            "temporal_alignment.ffn.net.0.weight": (d, d), "temporal_alignment.ffn.net.0.bias": (d,),
            "temporal_alignment.ffn.net.3.weight": (d, d), "temporal_alignment.ffn.net.3.bias": (d,),
        }
        for n in ("norm1", "norm2"):
            shapes.update({f"temporal_alignment.{n}.weight": (d,), f"temporal_alignment.{n}.bias": (d,)})
        for m in ("audio", "vision"):
            shapes.update({f"{m}_encoder.cls_embedding": (0,), f"{m}_encoder.fc.weight": (d, c[f"{m}_dim"]),
                           f"{m}_encoder.fc.bias": (d,), f"{m}_encoder.dense.weight": (d, d),
                           f"{m}_encoder.dense.bias": (d,)})
        if self.bert is not None:
            h = self.bert.config.hidden_size
            shapes.update({"text_encoder.extractor.pooler.dense.weight": (h, h),
                           "text_encoder.extractor.pooler.dense.bias": (h,)})
        return shapes

    def official_state_dict_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key of the official ``state_dict`` for this config with its shape (BERT keys only with a BERT)."""
        own = self.state_dict()
        shapes = {off: tuple(own[k].shape) for k, off in self.official_key_map().items()}
        shapes.update(self.official_unused_shapes())
        return shapes

    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an official ``DashFusion.state_dict()``; a wrong one fails listing missing / unexpected keys and
        shape mismatches. With ``use_text_features`` the official BERT weights are accepted and ignored."""
        expected = self.official_state_dict_shapes()
        given = dict(state_dict)
        if self.bert is None:
            given = {k: v for k, v in given.items() if not k.startswith("text_encoder.extractor.")}
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        wrong = sorted(f"{k}: expected {expected[k]}, got {tuple(given[k].shape)}"
                       for k in set(expected) & set(given) if tuple(given[k].shape) != expected[k])
        if missing or unexpected or wrong:
            parts = [f"{label} ({len(keys)}): {keys}" for label, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)) if keys]
            raise ValueError("state_dict does not match the official DashFusion layout for this config: "
                             + "; ".join(parts))
        for i in (0, 2):
            a, b = given[f"text_encoder.projector.MLP.{i}.weight"], given[f"text_encoder.projector.proj.{i}.weight"]
            if not torch.equal(a, b):
                raise ValueError(f"text_encoder.projector.MLP.{i}.weight must equal projector.proj.{i}.weight "
                                 "(the same tensor under two names in the official model)")
        self.load_state_dict({k: given[off] for k, off in self.official_key_map().items()}, strict=True)

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups as the official ``train.py``: no weight decay where the *official* name contains 'bias' or
        'LayerNorm.weight' (all biases, BERT's LayerNorm weights)."""
        names = self.official_key_map()
        return no_decay_param_groups(self.named_parameters(), self.config["weight_decay"], lambda k: names.get(k, k))


# --------------------------------------------------------------------------------------------------------------------
# our key → official key
# --------------------------------------------------------------------------------------------------------------------
_BLOCK_RULES = [  # inside one PostNormAttentionBlock ↔ official TransformerEncoder/CrossTransformerEncoder(depth 1)
    (r"^(to_query|to_key|to_value)\.", r"layers.0.0.fn.\1."),
    (r"^attn_norm\.", "layers.0.0.norm."),
    (r"^ffn\.(\d)\.", r"layers.0.1.fn.net.\1."),
    (r"^ffn_norm\.", "layers.0.1.norm."),
]
# Official HBF is called as HBF(H, t, v, a) against (x_m, x_t, x_a, x_v): its "a" modules see vision.
_EXCHANGE = {"0": "encoder_t", "1": "encoder_v", "2": "encoder_a"}  # our (text, audio, vision) order
_GATHER_SLOT = {"0": "t", "1": "v", "2": "a"}
_RULES = [
    (r"^bert\.", "text_encoder.extractor."),
    (r"^text_projector\.([02])\.", r"text_encoder.projector.proj.\1."),
    (r"^text_projector\.4\.", "text_encoder.projector.layernorm."),
    (r"^(audio|vision)_encoder\.input_proj\.", r"\1_encoder.encoder.pos_encoder.proj."),
    (r"^(audio|vision)_encoder\.cls_token$", r"\1_encoder.encoder.pos_encoder.cls_token"),
    (r"^(audio|vision)_encoder\.pos_embedding$", r"\1_encoder.encoder.pos_encoder.position_embeddings"),
    (r"^(audio|vision)_encoder\.layers\.(\d+)\.(in_proj_weight|in_proj_bias|out_proj\.)",
     r"\1_encoder.encoder.transformer_encoder.layers.\2.self_attn.\3"),
    (r"^(audio|vision)_encoder\.layers\.(\d+)\.", r"\1_encoder.encoder.transformer_encoder.layers.\2."),
    (r"^(audio|vision)_encoder\.norm\.", r"\1_encoder.layernorm."),
    (r"^temporal_alignment\.to_out\.", "temporal_alignment.to_out.0."),
    (r"^temporal_alignment\.", "temporal_alignment."),
    (r"^classifier\.(\d)\.", r"classifier.MLP.\1."),
]


def _to_official_key(key: str) -> str:
    m = re.match(r"^hbf\.levels\.(\d+)\.(query_self|exchange\.(\d)|query_gather)\.(.*)$", key)
    if m:
        level, part, slot, rest = m.groups()
        if part == "query_gather":
            rest = re.sub(r"^(to_[kv])\.(\d)\.", lambda g: f"{g[1]}_{_GATHER_SLOT[g[2]]}.", rest)
            return f"HBF.encoder_q2tav.{level}." + re.sub(r"^ffn\.(\d)\.", r"ffn.net.\1.", rest)
        module = "encoder_q" if part == "query_self" else _EXCHANGE[slot]
        for pat, repl in _BLOCK_RULES:
            if re.match(pat, rest):
                return f"HBF.{module}.{level}." + re.sub(pat, repl, rest)
        raise KeyError(key)
    for pat, repl in _RULES:
        if re.match(pat, key):
            return re.sub(pat, repl, key)
    raise KeyError(f"no official name for {key!r}")
