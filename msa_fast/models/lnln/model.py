"""LNLN — Language-dominated Noise-resistant Learning Network (Zhang, Wang, Yu, NeurIPS 2024).

Official code: Haoyu-ha/LNLN (``models/lnln.py``, ``models/basic_layers.py``, ``core/losses.py``); spec
``method_lnln.md``. Shapes: B batch, T = 8 summary tokens, d = 128 model width, L_t / L_a / L_v input lengths.

Inputs. LNLN reads the *incomplete* (token-erased) view and, for training, the *complete* view of the same samples.
Convention: the ``Batch`` passed in is the incomplete view; ``batch.complete`` holds the complete one (``None`` =
the batch is complete, as the missing-data protocol ``msa_fast.data.missing`` returns them). The completeness label is
``1 − batch.missing_rates[:, 0]`` (the *drawn* text erasure rate, official), or the realised fraction of erased
text tokens with ``completeness_target="realised"``.

Forward (official order):
1. BERT (fine-tuned) on the incomplete text → ``proj_l`` (Linear → token compressor) → h_1_l (B, T, d); ``proj_a``,
   ``proj_v`` on audio / vision → h_1_a, h_1_v. Compressors attend over T + L tokens, padding included (no masks).
2. DMC: completeness token (``completeness_check[0]``) → MLP + sigmoid → w (B,); proxy dominant feature h_1_p from
   [h_p; h_1_a; h_1_v] through gradient reversal; corrected dominant h_1_d = h_1_p·(1 − w) + h_1_l·w.
3. DMML: language encoder (3 hidden states) → hyper-modality encoder (one query, two softmaxes summed:
   ``msa_fast.ops.multi_source_attention``) → cross transformer → mean of the 8 non-extra tokens → Linear → M.
4. Auxiliary (training, or ``forward(batch, auxiliary=True)``): reconstructors on h_1_{a,v,l}; the complete view
   through the *same* BERT / compressors (not detached: the reconstruction target carries gradients, official);
   effectiveness discriminator on cat(h_1_d, complete h_l) flattened to (2·B·T, d).

The auxiliary branch never changes ``M`` / ``w``: ``model(batch)`` in eval mode gives the same prediction as the
training-style call.

Loss (official ``MultimodalLoss``): α·MSE(w, 1 − r_l) + β·CE(disc, [1]·BT ++ [0]·BT) + γ·MSE(rec, complete) +
σ·MSE(M, y); α 0.9, β 0.8 (SIMS 0.6), γ 0.1, σ 1.0. Without the auxiliary outputs l_adv = l_rec = 0.

Architecture quirks kept (spec §8a): inner attention width 512 with d = 128; separate q/k/v LayerNorms; no masks;
zeros summary tokens, randn fixed-length position embeddings, ones ``h_p`` / ``h_hyper``; hyper update
h ← LN4(h) + shift; gradient reversal on h_1_p *before* the mix, so the sentiment loss reaching the proxy path is
reversed too (spec §4 classifies this placement as an architecture quirk, not a pipeline bug, so there is no flag);
reconstruction target not detached, order [a, v, l]; prediction from the mean of the non-extra fusion tokens.
One deliberate deviation: the official ``.squeeze()`` after the completeness token makes B = 1 a special case; here
the token is indexed explicitly (same numbers for every B).

Algorithmic win (no number changes, tested): ``share_complete_pass``. The complete view differs from the incomplete
one only in erased rows (half the training rows per modality have rate 0). Rows whose inputs are identical in both
views reuse the incomplete pass instead of running BERT / the compressor again; only differing rows are recomputed.
``"auto"`` (default): audio/vision always (the compressors have no dropout, so reuse is exact); text whenever BERT
is dropout-free at that moment (eval mode or dropout probabilities 0) — in train mode the official code draws a second,
independent BERT dropout mask for the complete pass, which reuse would change. ``"always"``: also text in train
mode (one dropout mask for both views; faster, not the official noise). ``"never"``: the official two full passes.
(The spec's suggested name was ``share_complete_text_pass``.) Second exact win: ``kept_rows_only`` (default True) —
the token transformers whose output is cut to their first rows (the compressors' T summary tokens, the proxy
generator's T, the completeness token) compute only those rows in their last layer; False computes every row and
cuts afterwards, the official work (same numbers; ``msa-fast bench models --work equal`` uses it).

Pipeline bugs of the official code (spec §8b) and where they are fixed — none lives in the model:
- checkpoints selected on the **test** set, one per metric (author-confirmed, issue #21): the trainer selects on
  validation; the official behaviour is the trainer's ``select_on="test_per_metric"``;
- frozen erasure uniforms (``np.random.seed(missing_seed)`` inside ``generate_m``) and barely-resampled training
  masks: fixed in ``msa_fast.data.missing``, reproduced there with ``lnln_frozen_uniforms=True``;
- epoch 1 never checkpointed, evaluation batch size 1: trainer / evaluation (the model has no cross-sample op).

``use_text_features=True`` reads precomputed BERT features (``Batch.text_features``) instead of fine-tuning BERT
(not the official recipe, which fine-tunes BERT; useful for fast CPU runs). ``load_official_state_dict`` then ignores
the official ``bertmodel.*`` keys.

``freeze_bert=True`` (not official) freezes BERT: no gradient, eval mode (``model.train()`` keeps it there), out of
the optimizer; ``bert_feature_cache`` (default True) serves its features from a per-sample cache
(``msa_fast.nn.text_cache``: options, key, exactness, memory). Both views go through it: the cache key fingerprints
each row's token ids, so an erased incomplete row never hits the complete text's entry (or an older erasure); the
incomplete view's rows are stored only where they equal the complete view (erasures are redrawn every epoch), and a
frozen BERT is dropout-free, so ``share_complete_pass="auto"`` reuses the incomplete rows for the complete view.
``freeze_bert`` needs ``use_text_features=False``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.batch import Batch
from ...nn.text_cache import FREEZE_DEFAULTS, freeze_module, freeze_options, frozen_text_features, sample_keys
from ...nn.text_encoder import build_bert
from ..base import MSAModel
from .layers import CrossTransformer, GradientReversalLayer, HyperModalityEncoder, TokenTransformer
from ..registry import register

SHARE_MODES = ("auto", "always", "never")
COMPLETENESS_TARGETS = ("drawn", "realised")


class BertTextEncoder(nn.Module):
    """Holds the HF ``BertModel`` under ``model`` (official key prefix ``bertmodel.model.*``).

    ids / attention_mask / segment_ids (B, L) int → last hidden state (B, L, hidden).
    """

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.model = bert

    def forward(self, ids: Tensor, attention_mask: Tensor, segment_ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, attention_mask=attention_mask, token_type_ids=segment_ids)[0]

    @property
    def is_deterministic(self) -> bool:
        """True when a forward draws no dropout (eval mode, or every dropout probability 0)."""
        return not self.training or all(m.p == 0 for m in self.modules() if isinstance(m, nn.Dropout))


def _compressor(in_dim: int, num_frames: int, c: Mapping[str, Any]) -> nn.Sequential:
    """Linear in_dim → d, then a token compressor (T learned tokens prepended) → the T tokens (B, T, d) (the
    official code computes all T + n rows and keeps ``[:, :T]``; the last layer here computes only those)."""
    d = c["hidden_dim"]
    return nn.Sequential(
        nn.Linear(in_dim, d),
        TokenTransformer(num_frames, c["token_len"], d, c["compressor_depth"], c["heads"], c["mlp_dim"],
                         c["dim_head"], tokens_only=c["kept_rows_only"]))


@register("lnln")
class LNLN(MSAModel):
    """LNLN on a ``Batch`` (incomplete view) whose ``complete`` field holds the complete view.

    ``forward(batch, auxiliary=None) -> dict``: ``M`` (B,), ``w`` (B,) completeness score and the intermediates
    ``h_1_l/h_1_a/h_1_v`` (B, T, d), ``completeness_token`` (B, 1, d), ``h_1_p``, ``h_1_d``, ``h_d_list.{0,1,2}``,
    ``h_hyper`` (B, T, d), ``fusion_out`` (B, T+1, d), ``final_feature`` (B, d), ``bert.last_hidden_state``
    (B, L_t, 768, BERT only); with the auxiliary branch also ``complete.h_l/h_a/h_v``,
    ``complete.bert.last_hidden_state``, ``rec_a/rec_v/rec_l`` (B, T, d), ``rec_feats``, ``complete_feats``
    (B, 3T, d) and ``effectiveness_discriminator_out`` (2·B·T, 2).
    """

    TINY_CONFIG = {"use_text_features": True, "hidden_dim": 32, "mlp_dim": 32, "heads": 2, "dim_head": 16}
    CONFIGS: dict[str, dict[str, Any]] = {
        "common": {
            "bert": "bert-base-uncased",
            "use_text_features": False,
            **FREEZE_DEFAULTS,  # freeze_bert, bert_feature_cache(_max_entries): msa_fast.nn.text_cache
            "hidden_dim": 128,  # d (hard-coded 128 for h_p / h_hyper in the official code)
            "token_len": 8,  # T summary tokens
            "heads": 8,
            "dim_head": 64,  # inner width heads·dim_head = 512 (quirk: never overridden officially)
            "mlp_dim": 128,
            "compressor_depth": 2,
            "proxy_depth": 2,
            "completeness_depth": 2,
            "reconstructor_depth": 2,
            "language_encoder_depth": 2,
            "hyper_depth": 3,
            "hyper_heads": 8,  # hyper layer dim_head = hidden_dim / hyper_heads = 16
            "fusion_depth": 2,
            "discriminator_hidden": 64,
            "grl_alpha": 1.0,
            "alpha": 0.9, "beta": 0.8, "gamma": 0.1, "sigma": 1.0,  # MultimodalLoss weights
            "completeness_target": "drawn",
            "share_complete_pass": "auto",
            "kept_rows_only": True,  # False: last token-transformer layers compute every row, as the official code
            # official optimisation recipe (read by the trainer): AdamW over all parameters incl. BERT,
            # linear warm-up over 10 % of the epochs then cosine (official: stepped per epoch; the trainer steps per
            # batch, the same curve at finer granularity)
            "learning_rate": 1e-4, "weight_decay": 1e-4, "batch_size": 64, "epochs": 200, "warmup_ratio": 0.1,
            "lr_schedule": "cosine",
            "schedule_step": "epoch",  # official: warm-up + cosine stepped once per epoch
            "seeds": [1111, 1112, 1113], "eval_missing_rate": 0.5,
        },
        "mosi": {"fusion_depth": 2},
        "mosei": {"fusion_depth": 4},
        "sims": {"fusion_depth": 4, "beta": 0.6, "bert": "bert-base-chinese"},
    }

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        c = self.config
        self._validate_config(c)
        d, t = c["hidden_dim"], c["token_len"]
        self.token_len = t
        self.h_hyper = nn.Parameter(torch.ones(1, t, d))
        self.h_p = nn.Parameter(torch.ones(1, t, d))
        if c["use_text_features"]:
            self.bertmodel: Optional[BertTextEncoder] = None
            text_in = c["text_dim"]
        else:
            self.bertmodel = BertTextEncoder(build_bert(c["bert"]))
            text_in = self.bertmodel.model.config.hidden_size
        self.proj_l = _compressor(text_in, c["text_len"], c)
        self.proj_a = _compressor(c["audio_dim"], c["audio_len"], c)
        self.proj_v = _compressor(c["vision_dim"], c["vision_len"], c)
        enc = dict(dim=d, heads=c["heads"], mlp_dim=c["mlp_dim"], dim_head=c["dim_head"])
        kept = c["kept_rows_only"]
        self.proxy_dominate_modality_generator = TokenTransformer(3 * t, t, depth=c["proxy_depth"], tokens_only=kept,
                                                                  **enc)
        self.GRL = GradientReversalLayer(c["grl_alpha"])
        self.effective_discriminator = nn.Sequential(
            nn.Linear(d, c["discriminator_hidden"]), nn.LeakyReLU(0.1), nn.Linear(c["discriminator_hidden"], 2))
        self.completeness_check = nn.ModuleList([
            TokenTransformer(t, 1, depth=c["completeness_depth"], tokens_only=kept, **enc),
            nn.Sequential(nn.Linear(d, d // 2), nn.LeakyReLU(0.1), nn.Linear(d // 2, 1), nn.Sigmoid()),
        ])
        self.reconstructor = nn.ModuleList(
            TokenTransformer(t, None, depth=c["reconstructor_depth"], **enc) for _ in range(3))  # a, v, l
        self.dmml = nn.ModuleList([
            TokenTransformer(t, None, depth=c["language_encoder_depth"], save_hidden=True, **enc),
            HyperModalityEncoder(d, c["hyper_depth"], c["hyper_heads"], d // c["hyper_heads"]),
            CrossTransformer(t, t, depth=c["fusion_depth"], **enc),
            nn.Linear(d, 1),
        ])
        self.freeze_bert, self.bert_cache = freeze_options(c, self.bertmodel is not None)  # cache: plain attribute
        if self.freeze_bert:
            freeze_module(self.bertmodel)


    # Descriptive aliases of the official (index-named) sub-modules.
    language_encoder = property(lambda self: self.dmml[0])
    hyper_encoder = property(lambda self: self.dmml[1])
    fusion_transformer = property(lambda self: self.dmml[2])
    regression = property(lambda self: self.dmml[3])

    @staticmethod
    def _validate_config(c: Mapping[str, Any]) -> None:
        if c["share_complete_pass"] not in SHARE_MODES:
            raise ValueError(f"share_complete_pass must be one of {SHARE_MODES}, got {c['share_complete_pass']!r}")
        if c["completeness_target"] not in COMPLETENESS_TARGETS:
            raise ValueError(f"completeness_target must be one of {COMPLETENESS_TARGETS}, "
                             f"got {c['completeness_target']!r}")
        if c["hidden_dim"] % c["hyper_heads"]:
            raise ValueError(f"hidden_dim ({c['hidden_dim']}) must be divisible by hyper_heads ({c['hyper_heads']})")
        if c["hyper_depth"] > c["language_encoder_depth"] + 1:
            raise ValueError(f"hyper_depth ({c['hyper_depth']}) must be <= language_encoder_depth + 1 "
                             f"({c['language_encoder_depth'] + 1}): hyper layer i reads language hidden state i")

    # ------------------------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------------------------
    def forward(self, batch: Batch, auxiliary: Optional[bool] = None) -> dict[str, Tensor]:
        """``auxiliary``: compute reconstruction, complete view and discriminator (default: ``self.training``)."""
        self._check_batch(batch)
        aux = self.training if auxiliary is None else bool(auxiliary)
        t = self.token_len
        out: dict[str, Tensor] = {}

        bert_hidden, h_1_l = self._encode_text(batch)
        if bert_hidden is not None:
            out["bert.last_hidden_state"] = bert_hidden
        h_1_a = self.proj_a(batch.audio)[:, :t]
        h_1_v = self.proj_v(batch.vision)[:, :t]

        # DMC: completeness score and the proxy-corrected dominant (language) representation.
        token = self.completeness_check[0](h_1_l)[:, :1]  # (B, 1, d)
        w = self.completeness_check[1](token[:, 0])  # (B, 1)
        b = h_1_l.shape[0]
        h_1_p = self.proxy_dominate_modality_generator(
            torch.cat([self.h_p.expand(b, -1, -1), h_1_a, h_1_v], dim=1))[:, :t]
        h_1_p = self.GRL(h_1_p)
        wb = w.unsqueeze(-1)
        h_1_d = h_1_p * (1 - wb) + h_1_l * wb

        # DMML: language encoder → hyper-modality learning → fusion → regression.
        h_d_list = self.dmml[0](h_1_d)
        h_hyper = self.dmml[1](h_d_list, h_1_a, h_1_v, self.h_hyper.expand(b, -1, -1))
        fusion = self.dmml[2](h_hyper, h_d_list[-1])
        final = fusion[:, 1:].mean(dim=1)
        pred = self.dmml[3](final)

        out.update({"M": pred[:, 0], "w": w[:, 0], "h_1_l": h_1_l, "h_1_a": h_1_a, "h_1_v": h_1_v,
                    "completeness_token": token, "h_1_p": h_1_p, "h_1_d": h_1_d, "h_hyper": h_hyper,
                    "fusion_out": fusion, "final_feature": final})
        for i, h in enumerate(h_d_list):
            out[f"h_d_list.{i}"] = h
        if aux:
            out.update(self._auxiliary(batch, out))
        return out

    def _auxiliary(self, batch: Batch, out: dict[str, Tensor]) -> dict[str, Tensor]:
        """Reconstruction, complete-view features and the effectiveness discriminator (training branch)."""
        complete = batch.complete if batch.complete is not None else batch
        t = self.token_len
        aux: dict[str, Tensor] = {}
        rec_a = self.reconstructor[0](out["h_1_a"])
        rec_v = self.reconstructor[1](out["h_1_v"])
        rec_l = self.reconstructor[2](out["h_1_l"])

        share_text, share_av = self._sharing()
        same_text = _same_text_rows(batch, complete) if share_text else None
        if self.bertmodel is not None:
            def encode_text(rows: Optional[Tensor]) -> tuple[Tensor, Tensor]:
                hidden = self._bert(complete, rows)
                return hidden, self.proj_l(hidden)[:, :t]

            hidden, c_l = _reuse_rows(encode_text, (out["bert.last_hidden_state"], out["h_1_l"]), same_text)
            aux["complete.bert.last_hidden_state"] = hidden
        else:
            (c_l,) = _reuse_rows(lambda rows: (self.proj_l(_rows(_text_features(complete), rows))[:, :t],),
                                 (out["h_1_l"],), same_text)
        same_a = _same_rows(batch.audio, complete.audio) if share_av else None
        same_v = _same_rows(batch.vision, complete.vision) if share_av else None
        (c_a,) = _reuse_rows(lambda rows: (self.proj_a(_rows(complete.audio, rows))[:, :t],), (out["h_1_a"],), same_a)
        (c_v,) = _reuse_rows(lambda rows: (self.proj_v(_rows(complete.vision, rows))[:, :t],), (out["h_1_v"],),
                             same_v)

        disc_in = torch.cat([out["h_1_d"], c_l], dim=0).flatten(0, 1)  # (2·B·T, d)
        aux.update({
            "complete.h_l": c_l, "complete.h_a": c_a, "complete.h_v": c_v,
            "rec_a": rec_a, "rec_v": rec_v, "rec_l": rec_l,
            "rec_feats": torch.cat([rec_a, rec_v, rec_l], dim=1),
            "complete_feats": torch.cat([c_a, c_v, c_l], dim=1),
            "effectiveness_discriminator_out": self.effective_discriminator(disc_in),
        })
        return aux

    def _sharing(self) -> tuple[bool, bool]:
        """(reuse incomplete text rows, reuse incomplete audio/vision rows) under ``share_complete_pass``."""
        mode = self.config["share_complete_pass"]
        if mode == "never":
            return False, False
        if mode == "always" or self.bertmodel is None:
            return True, True
        return self.bertmodel.is_deterministic, True

    def _encode_text(self, batch: Batch) -> tuple[Optional[Tensor], Tensor]:
        """(BERT last hidden state (B, L_t, 768) or None, h_1_l (B, T, d)) of the batch's own text."""
        if self.bertmodel is None:
            return None, self.proj_l(_text_features(batch))[:, : self.token_len]
        store = None
        if self.bert_cache is not None and batch.complete is not None:
            store = _same_text_rows(batch, batch.complete)  # erased rows change every epoch: not kept
        hidden = self._bert(batch, None, store)
        return hidden, self.proj_l(hidden)[:, : self.token_len]

    def _bert(self, view: Batch, rows: Optional[Tensor], store: Optional[Tensor] = None) -> Tensor:
        if self.freeze_bert:
            return frozen_text_features(self.bertmodel, _rows(view.text_ids, rows),
                                        _rows(view.text_attention_mask, rows), _rows(view.text_segment_ids, rows),
                                        sample_keys(view, rows), self.bert_cache, encode=self.bertmodel, store=store)
        return self.bertmodel(_rows(view.text_ids, rows), _rows(view.text_attention_mask, rows),
                              _rows(view.text_segment_ids, rows))

    def _check_batch(self, batch: Batch) -> None:
        self.check_batch_inputs(batch, has_text_encoder=self.bertmodel is not None)
        if batch.complete is not None:
            cb = batch.complete
            for name in ("text_ids", "audio", "vision"):
                if getattr(cb, name).shape != getattr(batch, name).shape:
                    raise ValueError(f"batch.complete.{name} has shape {tuple(getattr(cb, name).shape)}, the "
                                     f"incomplete batch {tuple(getattr(batch, name).shape)}: the two views must "
                                     "hold the same samples with the same padding")

    # ------------------------------------------------------------------------------------------------------------
    # objective
    # ------------------------------------------------------------------------------------------------------------
    def completeness_labels(self, batch: Batch) -> Tensor:
        """(B,) target of w: 1 − drawn text erasure rate (official) or 1 − realised erased fraction."""
        dtype = batch.audio.dtype
        if self.config["completeness_target"] == "realised":
            return 1.0 - realised_text_erasure(batch).to(dtype)
        if batch.missing_rates is not None:
            return 1.0 - batch.missing_rates[:, 0].to(dtype)
        if batch.complete is None:
            return torch.ones(batch.batch_size, dtype=dtype, device=batch.labels.device)
        raise ValueError("LNLN's completeness label needs batch.missing_rates (the drawn erasure rates, (B, 3)) "
                         "when batch.complete is set; or use completeness_target='realised'")

    def loss(self, batch: Batch, outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Official ``MultimodalLoss``: α·l_cc + β·l_adv + γ·l_rec + σ·l_sp (l_adv, l_rec = 0 without auxiliaries)."""
        c = self.config
        pred, w = outputs["M"], outputs["w"]
        l_sp = F.mse_loss(pred, batch.labels.to(pred.dtype))
        l_cc = F.mse_loss(w, self.completeness_labels(batch).to(w.dtype))
        zero = pred.new_zeros(())
        disc = outputs.get("effectiveness_discriminator_out")
        if disc is not None:
            half = disc.shape[0] // 2  # first B·T rows: corrected (label 1), last B·T: complete (label 0)
            labels = torch.cat([torch.ones(half, dtype=torch.long, device=disc.device),
                                torch.zeros(disc.shape[0] - half, dtype=torch.long, device=disc.device)])
            l_adv = F.cross_entropy(disc, labels)
        else:
            l_adv = zero
        rec, target = outputs.get("rec_feats"), outputs.get("complete_feats")
        l_rec = F.mse_loss(rec, target) if rec is not None and target is not None else zero
        total = c["alpha"] * l_cc + c["beta"] * l_adv + c["gamma"] * l_rec + c["sigma"] * l_sp
        return {"loss": total, "l_sp": l_sp, "l_cc": l_cc, "l_adv": l_adv, "l_rec": l_rec}

    # ------------------------------------------------------------------------------------------------------------
    # official weights
    # ------------------------------------------------------------------------------------------------------------
    def load_official_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load an official ``LNLN.state_dict()`` (same key names; ``bertmodel.*`` ignored with text features).

        Raises ValueError listing missing keys, unexpected keys and shape mismatches.
        """
        sd = dict(state_dict)
        if self.bertmodel is None:
            sd = {k: v for k, v in sd.items() if not k.startswith("bertmodel.")}
        self.load_state_dict_checked(sd, "official LNLN state_dict")


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _rows(x: Tensor, rows: Optional[Tensor]) -> Tensor:
    return x if rows is None else x.index_select(0, rows)


def _text_features(view: Batch) -> Tensor:
    if view.text_features is None:
        raise ValueError("use_text_features=True but a batch view has text_features None")
    return view.text_features


def _same_rows(a: Tensor, b: Tensor) -> Tensor:
    """(B,) bool: row i of a equals row i of b everywhere."""
    if a is b:
        return torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    return (a == b).flatten(1).all(dim=1)


def _same_text_rows(a: Batch, b: Batch) -> Tensor:
    same = _same_rows(a.text_ids, b.text_ids) & _same_rows(a.text_attention_mask, b.text_attention_mask) \
        & _same_rows(a.text_segment_ids, b.text_segment_ids)
    if a.text_features is not None and b.text_features is not None:
        same = same & _same_rows(a.text_features, b.text_features)
    return same


def _reuse_rows(encode: Callable[[Optional[Tensor]], tuple[Tensor, ...]], reuse: tuple[Tensor, ...],
                same: Optional[Tensor]) -> tuple[Tensor, ...]:
    """``encode(None)`` (every row of the complete view), computing only the rows where ``same`` is False and
    taking the others from ``reuse`` (the incomplete pass, identical there). ``same`` None = no reuse.

    ``encode(rows)`` returns a tuple of (len(rows), ...) tensors; ``reuse`` holds the matching (B, ...) tensors.
    """
    if same is None:
        return encode(None)
    differ = (~same).nonzero().squeeze(1)  # one host sync: the row count decides the work
    if differ.numel() == 0:
        return reuse
    if differ.numel() == same.numel():
        return encode(None)
    return tuple(r.index_copy(0, differ, e) for r, e in zip(reuse, encode(differ)))


def realised_text_erasure(batch: Batch) -> Tensor:
    """(B,) fraction of erasable text tokens (valid, not [CLS] / the last valid token) that were erased.

    Uses ``batch.text_keep_mask`` when set, otherwise compares token ids with ``batch.complete``.
    """
    valid = batch.text_attention_mask.bool()
    if batch.text_keep_mask is not None:
        erased = valid & ~batch.text_keep_mask
    elif batch.complete is not None:
        erased = valid & (batch.text_ids != batch.complete.text_ids)
    else:
        erased = torch.zeros_like(valid)
    erasable = (valid.sum(dim=1) - 2).clamp_min(1)
    return erased.sum(dim=1).float() / erasable
