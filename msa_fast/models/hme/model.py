"""HME — Hyper-Modality Enhancement for multimodal sentiment analysis with missing modalities (Zhuang et al.,
NeurIPS 2025).

Official code: YetZzzzzz/HME @ 6f0c9a7 (``HME_MSA/HME_model.py``, ``model_utils.py``, ``modules/``); spec
``method_hme.md``. Shapes: B batch, L = 50 word-aligned positions, d = ``d_l`` (192 MOSI/MOSEI, argparse default 96).
MOSI and MOSEI only (the official argparse rejects other datasets).

Inputs. HME reads **word-aligned** audio / vision: one row per BERT token position, zero rows at [CLS], [SEP] and
padding (the MAG-BERT layout). ``alignment="aligned"`` (default): ``Batch.audio`` / ``Batch.vision`` are already
(B, L_t, D) word-aligned (MMSA ``aligned_50`` pickles, ``msa_fast.data.read_mag``, or the parity fixture's
``*_aligned`` arrays). ``alignment="word_align"``: unaligned frames are aligned inside the forward with
``msa_fast.data.word_align`` (the HME adapter rule: near-equal contiguous chunks of the valid frames per word).
Availability (B, 3) (text, audio, vision) comes from ``Batch.availability`` (None = all present).

Forward (official order, ``HME.forward`` == ``HME.test``):
1. BERT (embeddings + encoder, no pooler, fine-tuned) → (B, L, 768); missing text zeroed **after** BERT, missing
   audio / vision inputs zeroed before their projections.
2. Per modality: Conv1d(k=1, no bias) → MulT encoder (positions keyed on channel 0; separate embedding dropout for
   q / k / v; keys / values of every layer = the embedded input) → **max** pool over time → H_m (B, d).
3. Threshold retrieval R_m (``hme_retrieval``); Perceiver enhancement E_m = latent_m(R_m), E_S = latent_sample(H_l,
   H_a, H_v); six pairwise hyper blocks and hyper_m = Enc(E_S, [pair, pair]); VIB per modality (σ = softplus(raw − 5));
   uncertainty gates S_m = ATTN_m(H_m, F_m, σ_m), S_H = ATTN_hyper(F, σ); post-LN transformer (2 layers, FFN 2048)
   over (S_l, S_a, S_v, S_H) → cat → MLP → M.

Loss (``train_epoch``): L1(M, y) + 0.8 · mean_m L1(logit_m, y) + 0.01 · mean_m KL_m.

Architecture quirks kept (spec §9a): max pooling; channel-0 positions; text zeroed after BERT; in-batch threshold
retrieval with unweighted mean, entry-sum == 0 fallback and gradients through neighbours; Perceiver over a single
retrieved token; VIB σ = softplus(raw − 5); gates incl. the d^-½ scaling; final post-LN encoder with FFN 2048; all
three MulT encoders use ``attn_dropout`` (0.5) — the per-modality values ``attn_dropout_a/_v`` are ignored by the
official builder; ``per_modality_attn_dropout=True`` uses them.

Pipeline / evaluation bugs fixed by default, official behaviour behind a flag (spec §9b):
- ``eval_retrieval="bank"`` (default): at evaluation R_m is retrieved from a memory bank of the **training set**'s
  H_m (``msa_fast.retrieval.MemoryBank``; same threshold rule over all rows, no self exclusion; ``hme_retrieval``), so
  predictions do not depend on the composition of the evaluation batch. The bank is (re)built lazily — at the first
  evaluation forward after training steps — by encoding the train split that ``prepare_epoch`` recorded (eval mode,
  no grad; a modality the train data marks missing is never retrieved), or explicitly with
  ``build_memory_bank(train_data)``. ``eval_retrieval="in_batch"``: the official transductive retrieval over the
  evaluation batch. Training always retrieves in-batch (official).
- ``vib_sample_at_eval=False`` (default): the VIB code is μ at evaluation; ``True``: μ + ε·σ as the official code.
  ``vib_sample_in_training=False`` (not official) uses μ in training too: a deterministic step (e.g. to compare a
  data-parallel run with one process, whose noise draws differ by rank).
- Masks redrawn per epoch, loaders shuffled at evaluation, optimizer re-created per epoch: data / trainer level
  (``msa_fast.data.ModalityDrop``, trainer options), not in the model.
One deliberate deviation: the official ``.squeeze()`` after pooling makes B = 1 a special case; here it is not.

Algorithmic wins (no number changes, tested): retrieval through one sync-free op
(``msa_fast.retrieval.in_batch.in_batch_retrieve``: masked GEMMs, or a fused Triton kernel on CUDA) instead of the
per-row ``nonzero()`` loop (B host syncs per modality); single-context-token cross-attention computes ``to_out(V)``
directly (softmax over one key ≡ 1); MulT K/V share one LayerNorm and one GEMM in eval mode.

Options (not official): ``retrieval_exclude_missing=True`` keeps rows whose modality is missing out of the in-batch
candidates; ``use_text_features=True`` reads ``Batch.text_features`` instead of running BERT (``bert.*`` keys are
then ignored by ``load_official_state_dict``); ``retrieval_backend`` picks the retrieval op's backend;
``freeze_bert=True`` freezes BERT (no gradient, eval mode, out of the optimizer; the official model fine-tunes it)
and ``bert_feature_cache`` (default True) then serves its features from a per-sample cache, bounded by
``bert_feature_cache_max_entries`` (``msa_fast.nn.text_cache``: key, exactness, memory; ``freeze_bert`` needs
``use_text_features=False``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.alignment import word_align
from ...data.batch import Batch
from ...nn.dropout import Dropout
from ...nn.text_cache import FREEZE_DEFAULTS, freeze_module, freeze_options, frozen_text_features, sample_keys
from ...nn.text_encoder import build_bert
from ..base import MSAModel, no_decay_param_groups
from .layers import (HyperEncoder, LatentTransformer, MulTEncoder, UncertaintyGate2, UncertaintyGate3,
                         VIBEstimate)
from ...retrieval.in_batch import in_batch_retrieve
from ...retrieval.memory_bank import MemoryBank
from .retrieval import bank_retrieve, build_hme_bank
from ..registry import register

MODS = ("l", "a", "v")
PAIRS = ("l2a", "l2v", "a2l", "a2v", "v2l", "v2a")
ALIGNMENTS = ("aligned", "word_align")
EVAL_RETRIEVALS = ("bank", "in_batch")


@register("hme")
class HME(MSAModel):
    """HME on a ``Batch``. ``forward(batch, details=False) -> dict``: ``M`` (B,), ``logits_l/a/v`` (B,),
    ``info_losses`` (), and the intermediates ``mult_l/a/v`` (L, B, d) time-first as the official code, ``H_*``,
    ``R_*``, ``E_*``, ``E_S``, ``hyper_pair.*``, ``hyper_*``, ``vib_*.{mu,std,encoding}`` (B, d), ``vib_*.logits``
    (B, 1), ``vib_*.kl`` (), ``S_l/a/v``, ``S_H`` (B, d), ``final_encoder`` (4, B, d), ``bert.last_hidden_state``
    (B, L, 768; BERT only). ``details=True`` adds ``retrieval.cos_*`` (B, N) and ``retrieval.neighbours_*``.
    """

    cross_sample_training = True  # the objective mixes samples of a batch (see msa_fast.train.dist)
    gathers_global_batch = True  # training retrieval over the global batch (_in_batch_retrieve)
    # the official 1-token-key attentions never use their q projection / pre-norm: DDP must not wait for them
    ddp_find_unused_parameters = True
    TINY_CONFIG = {"use_text_features": True, "d_l": 32, "num_heads": 4, "layers": 1, "latent_layers": 1,
                   "final_layers": 1, "final_ffn_dim": 64, "hyper_depth": 1}
    CONFIGS: dict[str, dict[str, Any]] = {
        "common": {
            "bert": "bert-base-uncased",
            "use_text_features": False,
            **FREEZE_DEFAULTS,  # freeze_bert, bert_feature_cache(_max_entries): msa_fast.nn.text_cache
            "alignment": "aligned",
            # architecture (official argparse names)
            "d_l": 192, "num_heads": 16, "layers": 4, "hyper_depth": 3, "latent_layers": 4, "num_latents": 5,
            "similarity_threshold": 0.6, "uncertainty_LB": 0.2, "uncertainty_UB": 1.0,
            "attn_dropout": 0.5, "attn_dropout_a": 0.2, "attn_dropout_v": 0.0, "per_modality_attn_dropout": False,
            "relu_dropout": 0.3, "res_dropout": 0.3, "embed_dropout": 0.2, "gate_dropout": 0.3, "dropout": 0.1,
            "final_layers": 2, "final_ffn_dim": 2048, "final_dropout": 0.1,
            # objective
            "unimodal_weight": 0.8, "kl_weight": 0.01,
            # evaluation-time behaviour (see module docstring)
            "eval_retrieval": "bank", "vib_sample_at_eval": False, "vib_sample_in_training": True, "retrieval_exclude_missing": False,
            "retrieval_backend": "auto",
            "bank_batch_size": 128,
            # official optimisation recipe (read by the trainer)
            "learning_rate": 2e-5, "weight_decay": 1e-4, "adam_epsilon": 1e-8, "batch_size": 256,
            "eval_batch_size": 128, "epochs": 100, "patience": 10, "grad_clip_value": 0.8,
            "reset_optimizer_each_epoch": False, "missing_rate": 0.2, "seed": 5576,
        },
        "mosi": {"layers": 4, "latent_layers": 4, "missing_rate": 0.2, "attn_dropout_a": 0.2},
        "mosei": {"layers": 2, "latent_layers": 3, "missing_rate": 0.1, "attn_dropout_a": 0.0},
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        c = self.config
        self._validate_config(c)
        d, heads = c["d_l"], c["num_heads"]
        self.d = d
        if c["use_text_features"]:
            self.bert: Optional[nn.Module] = None
            text_in = c["text_dim"]
        else:
            self.bert = build_bert(c["bert"], add_pooling_layer=False)
            text_in = self.bert.config.hidden_size

        def mult(dropout: float) -> MulTEncoder:
            return MulTEncoder(d, heads, c["layers"], dropout, c["relu_dropout"], c["res_dropout"],
                               c["embed_dropout"])

        per_mod = c["per_modality_attn_dropout"]
        self.l2l = mult(c["attn_dropout"])
        self.a2a = mult(c["attn_dropout_a"] if per_mod else c["attn_dropout"])
        self.v2v = mult(c["attn_dropout_v"] if per_mod else c["attn_dropout"])
        for name in PAIRS + ("hyper_l", "hyper_a", "hyper_v"):
            setattr(self, name, HyperEncoder(d, c["hyper_depth"], heads, d // heads))
        for name in ("latent_sample", "latent_text", "latent_audio", "latent_video"):
            setattr(self, name, LatentTransformer(c["num_latents"], d, c["latent_layers"], heads, d // heads))
        self.proj_l_1 = nn.Conv1d(text_in, d, kernel_size=1, bias=False)
        self.proj_a_1 = nn.Conv1d(c["audio_dim"], d, kernel_size=1, bias=False)
        self.proj_v_1 = nn.Conv1d(c["vision_dim"], d, kernel_size=1, bias=False)
        for m in MODS:
            setattr(self, f"VIB_estimate_{m}_p", VIBEstimate(d, d, 1))
        lb, ub = c["uncertainty_LB"], c["uncertainty_UB"]
        self.ATTN_T = UncertaintyGate2(d, d, lb, ub, c["gate_dropout"])
        self.ATTN_A = UncertaintyGate2(d, d, lb, ub, c["gate_dropout"])
        self.ATTN_V = UncertaintyGate2(d, d, lb, ub, c["gate_dropout"])
        self.ATTN_hyper = UncertaintyGate3(d, d, c["gate_dropout"])
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=c["final_ffn_dim"], dropout=c["final_dropout"])
        self.transformer_encoder_all = nn.TransformerEncoder(layer, c["final_layers"], enable_nested_tensor=False)
        self.fusion_all = nn.Sequential()
        self.fusion_all.add_module("fusion_layer_all", nn.Linear(4 * d, 2 * d))
        self.fusion_all.add_module("fusion_layer_all_dropout", Dropout(c["dropout"]))
        self.fusion_all.add_module("fusion_layer_all_activation", nn.ReLU())
        self.fusion_all.add_module("fusion_layer_all_all", nn.Linear(2 * d, 1))
        self._init_like_official()
        self.freeze_bert, self.bert_cache = freeze_options(c, self.bert is not None)  # cache: plain attribute
        if self.freeze_bert:
            freeze_module(self.bert)
        self.bank: Optional[MemoryBank] = None  # not a module: never part of the (official) state_dict
        self._bank_source: Any = None
        self._bank_stale = True

    @staticmethod
    def _validate_config(c: Mapping[str, Any]) -> None:
        if c["alignment"] not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {c['alignment']!r}")
        if c["eval_retrieval"] not in EVAL_RETRIEVALS:
            raise ValueError(f"eval_retrieval must be one of {EVAL_RETRIEVALS}, got {c['eval_retrieval']!r}")
        if c["d_l"] % c["num_heads"]:
            raise ValueError(f"d_l ({c['d_l']}) must be divisible by num_heads ({c['num_heads']})")
        for key in ("layers", "hyper_depth", "latent_layers", "num_latents", "final_layers"):
            if not isinstance(c[key], int) or c[key] < 1:
                raise ValueError(f"{key} must be a positive int, got {c[key]!r}")

    def _init_like_official(self) -> None:
        """``BertPreTrainedModel.init_weights`` on the non-BERT modules: Linear N(0, 0.02) / zero bias, LayerNorm
        ones / zeros. Conv1d, the MulT packed ``in_proj_weight`` (xavier) and the latents (randn) keep theirs."""
        for name, module in self.named_modules():
            if name == "bert" or name.startswith("bert."):
                continue
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, details: bool = False) -> dict[str, Tensor]:
        out = self.encode(batch)
        h = [out[f"H_{m}"] for m in MODS]
        if self.training:
            self._bank_stale = True
        use_bank = not self.training and self.config["eval_retrieval"] == "bank"
        if use_bank:
            self._refresh_bank()
            if self.bank is None:
                raise RuntimeError("HME memory bank is empty: train the model (prepare_epoch records the train "
                                   "split), call model.build_memory_bank(train_data), or set eval_retrieval='in_batch'")
        avail = batch.availability_or_ones().to(h[0].device).bool()
        for i, m in enumerate(MODS):
            if use_bank:
                r, info = bank_retrieve(self.bank, m, h[i], self.config["similarity_threshold"], details)
            else:
                ok = avail[:, i] if self.config["retrieval_exclude_missing"] else None
                r, info = self._in_batch_retrieve(h[i], ok, details)
            out[f"R_{m}"] = r
            if details:
                out[f"retrieval.cos_{m}"], out[f"retrieval.neighbours_{m}"] = info["cos"], info["neighbours"]
        out.update(self.fuse(out))
        return out

    def _in_batch_retrieve(self, h: Tensor, available: Optional[Tensor], details: bool) -> tuple[Tensor, dict]:
        """The official in-batch retrieval over the **global** batch of the step: under data-parallel training the
        rows of every rank are all-gathered with gradient (``self.batch_scope``), retrieved over, and this rank's
        rows kept — the single-process result and gradient. A rank holding only a zero-weight stand-in row
        retrieves over itself (it still takes part in the gather)."""
        kwargs = dict(threshold=self.config["similarity_threshold"],
                      backend="torch" if details else self.config["retrieval_backend"], return_similarity=details)
        scope = self.batch_scope
        if not (self.training and scope.active):
            return in_batch_retrieve(h, available, **kwargs)
        rows, mine = scope.gather(h)
        ok = None if available is None else scope.gather(available.to(h.dtype))[0] > 0.5
        if mine.stop == mine.start:
            return in_batch_retrieve(h, available, **kwargs)
        r, info = in_batch_retrieve(rows, ok, **kwargs)
        return r[mine], {k: v[mine] for k, v in info.items()}

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """BERT, missing-modality zeroing, projections, MulT encoders and max pooling: ``H_l/a/v`` (B, d),
        ``mult_l/a/v`` (L, B, d) and ``bert.last_hidden_state``."""
        self._check_batch(batch)
        out: dict[str, Tensor] = {}
        if self.bert is None:
            text = batch.text_features
        elif self.freeze_bert:
            text = frozen_text_features(self.bert, batch.text_ids, batch.text_attention_mask, batch.text_segment_ids,
                                        sample_keys(batch), self.bert_cache)
            out["bert.last_hidden_state"] = text
        else:
            text = self.bert(input_ids=batch.text_ids, attention_mask=batch.text_attention_mask,
                             token_type_ids=batch.text_segment_ids)[0]
            out["bert.last_hidden_state"] = text
        audio, vision = self._aligned_audio_vision(batch)
        avail = batch.availability
        if avail is not None:
            avail = avail.to(text.device).bool()
            text = torch.where(avail[:, 0, None, None], text, torch.zeros_like(text))
            audio = torch.where(avail[:, 1, None, None], audio, torch.zeros_like(audio))
            vision = torch.where(avail[:, 2, None, None], vision, torch.zeros_like(vision))
        for m, x, proj, enc in (("l", text, self.proj_l_1, self.l2l), ("a", audio, self.proj_a_1, self.a2a),
                                ("v", vision, self.proj_v_1, self.v2v)):
            y = enc(F.linear(x, proj.weight[..., 0]))  # Conv1d(k=1, no bias) on batch-first rows
            out[f"mult_{m}"] = y.transpose(0, 1)
            out[f"H_{m}"] = y.amax(dim=1)
        return out

    def fuse(self, out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """From ``H_*`` and ``R_*``: enhancement, hyper-modalities, VIB, gates, final encoder and prediction."""
        res: dict[str, Tensor] = {}
        e = {"l": self.latent_text(out["R_l"][:, None]), "a": self.latent_audio(out["R_a"][:, None]),
             "v": self.latent_video(out["R_v"][:, None])}
        for m in MODS:
            res[f"E_{m}"] = e[m]
        e_s = self.latent_sample(torch.stack([out[f"H_{m}"] for m in MODS], dim=1))
        res["E_S"] = e_s
        for pair in PAIRS:
            src, dst = pair[0], pair[2]
            res[f"hyper_pair.{pair}"] = getattr(self, pair)(e[src][:, None], e[dst][:, None])
        sample = self.config["vib_sample_in_training"] if self.training else self.config["vib_sample_at_eval"]
        vib = {}
        for m in MODS:
            others = [p for p in PAIRS if p[0] == m]
            ctx = torch.stack([res[f"hyper_pair.{p}"] for p in others], dim=1)
            res[f"hyper_{m}"] = getattr(self, f"hyper_{m}")(e_s[:, None], ctx)
            vib[m] = getattr(self, f"VIB_estimate_{m}_p")(res[f"hyper_{m}"], sample)
            for k, v in vib[m].items():
                res[f"vib_{m}.{k}"] = v
            res[f"logits_{m}"] = vib[m]["logits"][:, 0]
        codes, stds = [vib[m]["encoding"] for m in MODS], [vib[m]["std"] for m in MODS]
        res["S_H"] = self.ATTN_hyper(codes, stds)
        for m, gate in zip(MODS, (self.ATTN_T, self.ATTN_A, self.ATTN_V)):
            res[f"S_{m}"] = gate(out[f"H_{m}"], vib[m]["encoding"], vib[m]["std"])
        tokens = torch.stack([res["S_l"], res["S_a"], res["S_v"], res["S_H"]], dim=0)  # (4, B, d) sequence-first
        hidden = self.transformer_encoder_all(tokens)
        res["final_encoder"] = hidden
        res["M"] = self.fusion_all(torch.cat(tuple(hidden), dim=1))[:, 0]
        res["info_losses"] = (vib["l"]["kl"] + vib["a"]["kl"] + vib["v"]["kl"]) / 3.0
        return res

    def _aligned_audio_vision(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if self.config["alignment"] == "word_align":
            lt = batch.text_ids.shape[1]
            return (word_align(batch.audio, batch.audio_lengths, batch.text_lengths, out_len=lt),
                    word_align(batch.vision, batch.vision_lengths, batch.text_lengths, out_len=lt))
        return batch.audio, batch.vision

    def _check_batch(self, batch: Batch) -> None:
        c = self.config
        if not isinstance(batch, Batch):
            raise TypeError(f"batch must be a msa_fast Batch, got {type(batch).__name__}")
        lt = batch.text_ids.shape[1]
        for name, x, dim in (("audio", batch.audio, c["audio_dim"]), ("vision", batch.vision, c["vision_dim"])):
            if x.dim() != 3 or x.shape[-1] != dim:
                raise ValueError(f"batch.{name} must be (B, L, {dim}), got {tuple(x.shape)}")
            if c["alignment"] == "aligned" and x.shape[1] != lt:
                raise ValueError(f"batch.{name} has {x.shape[1]} steps but the text {lt}: HME needs word-aligned "
                                 "features (aligned_50 data), or set alignment='word_align' for unaligned data")
        if self.bert is None:
            if batch.text_features is None:
                raise ValueError("use_text_features=True but batch.text_features is None")
            if batch.text_features.shape[-1] != c["text_dim"]:
                raise ValueError(f"batch.text_features must be (B, L, {c['text_dim']}), got "
                                 f"{tuple(batch.text_features.shape)}")
        if batch.availability is not None and batch.availability.shape != (batch.batch_size, 3):
            raise ValueError(f"batch.availability must be (B, 3) (text, audio, vision), got "
                             f"{tuple(batch.availability.shape)}")

    # ------------------------------------------------------------------------------------------------------------
    # memory bank (eval_retrieval="bank")
    # ------------------------------------------------------------------------------------------------------------
    def prepare_epoch(self, epoch: int, train_data: Any) -> None:
        """Records the train split as the memory-bank source (encoded at the next evaluation forward)."""
        self._bank_source = train_data
        self._bank_stale = True

    @torch.no_grad()
    def refresh_train_state(self, train_data: Any) -> None:
        """The memory bank is derived from the train split with the current weights: rebuild it."""
        self.build_memory_bank(train_data)

    def build_memory_bank(self, train_data: Any) -> None:
        """Encode the train split (eval mode) into the bank (``msa_fast.retrieval.MemoryBank``): H_m per sample, by
        ``Batch.index``, in batches of ``bank_batch_size``. A modality the train data marks missing
        (``Batch.availability``) is stored as unavailable and never retrieved.

        ``train_data``: an ``MMSADataset`` / split dict, a DataLoader, a whole-split ``Batch``, or any iterable of
        ``Batch`` covering it (``msa_fast.data.dataset.iterate_batches``).
        """
        was_training = self.training
        self.eval()
        try:
            self.bank = build_hme_bank(self.encode, train_data, MODS, self.d, self.config["bank_batch_size"],
                                       self.device)
        finally:
            self.train(was_training)
        self._bank_source = train_data
        self._bank_stale = False

    def prepare_evaluation(self) -> None:
        """Builds a stale memory bank before the evaluation pass (on every rank together: the train split is encoded
        1/world per rank and gathered)."""
        if not self.training and self.config["eval_retrieval"] == "bank":
            self._refresh_bank()

    def _refresh_bank(self) -> None:
        if self._bank_stale and self._bank_source is not None:
            self.build_memory_bank(self._bank_source)

    # ------------------------------------------------------------------------------------------------------------
    # objective
    # ------------------------------------------------------------------------------------------------------------
    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The official optimizer's groups (``transformers`` AdamW in ``train.py``): no weight decay on names
        containing 'bias' or 'LayerNorm.weight' (our parameter names are the official ones)."""
        return no_decay_param_groups(self.named_parameters(), self.config["weight_decay"])

    def loss(self, batch: Batch, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """L1(M, y) + unimodal_weight · mean_m L1(logit_m, y) + kl_weight · info_losses."""
        c = self.config
        y = batch.labels.to(outputs["M"].dtype).reshape(-1)
        task = F.l1_loss(outputs["M"].reshape(-1), y)
        unimodal = sum(F.l1_loss(outputs[f"logits_{m}"].reshape(-1), y) for m in MODS) / 3.0
        kl = outputs["info_losses"]
        total = task + c["unimodal_weight"] * unimodal + c["kl_weight"] * kl
        return {"loss": total, "loss_task_l1": task, "loss_unimodal_l1_mean": unimodal, "info_losses_kl": kl}

    # ------------------------------------------------------------------------------------------------------------
    # official weights
    # ------------------------------------------------------------------------------------------------------------
    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an official ``HME.state_dict()`` (same key names; ``bert.*`` ignored with text features).

        Raises ValueError listing missing keys, unexpected keys and shape mismatches. The memory bank is marked stale.
        """
        sd = dict(state_dict)
        if self.bert is None:
            sd = {k: v for k, v in sd.items() if not k.startswith("bert.")}
        self.load_state_dict_checked(sd, "official HME state_dict")
        self._bank_stale = True
