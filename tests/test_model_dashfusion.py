"""DashFusion: official parity, weight loading, exact savings, the partner objective and "it learns"."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from msa_fast.data.batch import Batch
from msa_fast.data.dataset import select_rows
from msa_fast.models import build
from msa_fast.models.dashfusion.partners import draw_partners, official_pair_indices, partner_ntxent_loss
from msa_fast.nn.text_encoder import TINY_BERT_CONFIG
from msa_fast.retrieval.partners import official_partner_loop

from parity_fixtures import load_parity
MANIFESTS = Path(__file__).resolve().parent / "manifests"


@pytest.fixture(scope="module")
def fixture():
    return load_parity("dashfusion_mosi.pt")


def _fixture_batch(fx) -> Batch:
    x = fx["inputs_mmsa"]
    tb = x["text_bert"].long()
    n = x["regression_labels"].shape[0]
    return Batch(text_ids=tb[:, 0], text_attention_mask=tb[:, 1], text_segment_ids=tb[:, 2], audio=x["audio"],
                 vision=x["vision"], audio_lengths=x["audio_lengths"], vision_lengths=x["vision_lengths"],
                 labels=x["regression_labels"], index=torch.arange(n), ids=list(x["id"]),
                 raw_text=list(x["raw_text"]))


# Fixture output key → ours (the official "encoder_a" modules process vision, "encoder_v" audio).
FIXTURE_KEYS = {"hbf.0.encoder_q": "hbf.0.self", "hbf.0.encoder_t": "hbf.0.text", "hbf.0.encoder_a": "hbf.0.vision",
                "hbf.0.encoder_v": "hbf.0.audio", "hbf.1.encoder_q": "hbf.1.self",
                "hbf.1.encoder_t.token0": "hbf.1.text.token0", "hbf.1.encoder_a.token0": "hbf.1.vision.token0",
                "hbf.1.encoder_v.token0": "hbf.1.audio.token0"}


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.double() - e.double()).abs().max() / e.double().abs().max()).item()


@pytest.mark.slow
def test_parity_with_official_outputs(fixture):
    # the fixture batch is ragged and the official HBF attends to the batch's text padding: reproduce that
    model = build("dashfusion", dataset="mosi", bert=fixture["bert_config"], unmasked_text_padding=True)
    model.load_official_state_dict(fixture["state_dict"])
    model.eval()
    batch = _fixture_batch(fixture)
    with torch.no_grad():
        out = model(batch)
    expected = fixture["outputs"]
    assert set(FIXTURE_KEYS.get(k, k) for k in expected) <= set(out)
    for key, e in expected.items():
        a = out[FIXTURE_KEYS.get(key, key)]
        assert a.shape == e.shape, key
        assert _rel(a, e) <= 1e-4, (key, _rel(a, e))
    losses = model.loss(batch, out)
    for ours, theirs in (("loss", "loss"), ("pred_loss_mse", "pred_loss_mse"), ("const_loss", "const_loss")):
        assert abs(losses[ours].item() - fixture["loss_terms"][theirs]) <= 1e-4 * max(1.0, abs(fixture["loss"]))


def test_fixture_inputs_match_our_crop_and_masks(fixture):
    """The official tokenizer's ids = text_bert cropped to the batch's longest text; padding masks agree."""
    batch = _fixture_batch(fixture)
    tok = fixture["inputs_official"]["tokenized"]
    n = int(batch.text_lengths.max())
    assert torch.equal(tok["input_ids"], batch.text_ids[:, :n])
    assert torch.equal(tok["attention_mask"], batch.text_attention_mask[:, :n])
    assert torch.equal(tok["token_type_ids"], batch.text_segment_ids[:, :n])
    s1 = fixture["inputs_official"]["sample1"]
    for zero_rule in (False, True):
        model = build("dashfusion", dataset="mosi", use_text_features=True, mask_zero_frames=zero_rule)
        assert torch.equal(model._frame_padding_mask(batch.audio, batch.audio_lengths), s1["audio_padding_mask"])
        assert torch.equal(model._frame_padding_mask(batch.vision, batch.vision_lengths), s1["vision_padding_mask"])


# ---------------------------------------------------------------------------------------------------------------
# official state_dict layout
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
def test_official_key_manifest(dataset):
    manifest = json.loads((MANIFESTS / f"dashfusion_{dataset}.json").read_text())["keys"]
    model = build("dashfusion", dataset=dataset, bert=TINY_BERT_CONFIG)
    assert {k: list(v) for k, v in model.official_state_dict_shapes().items()} == manifest


def test_manifest_matches_fixture_state_dict(fixture):
    manifest = json.loads((MANIFESTS / "dashfusion_mosi.json").read_text())["keys"]
    assert {k: list(v.shape) for k, v in fixture["state_dict"].items()} == manifest


def _tiny(**kw):
    cfg = dict(dataset="mosi", use_text_features=True, text_dim=24, d_model=16, encoder_heads=2, encoder_ff_dim=24,
               ta_heads=2, ta_dim_head=8, fusion_heads=2, fusion_ff_dim=24, audio_layers=1, vision_layers=1,
               audio_len=12, vision_len=9, audio_dim=5, vision_dim=7)
    cfg.update(kw)
    return build("dashfusion", **cfg)


def _official_like_state_dict(model):
    sd = {off: model.state_dict()[k].clone() for k, off in model.official_key_map().items()}
    for k, shape in model.official_unused_shapes().items():
        sd[k] = torch.randn(shape)
    for i in (0, 2):
        sd[f"text_encoder.projector.MLP.{i}.weight"] = sd[f"text_encoder.projector.proj.{i}.weight"].clone()
    return sd


def test_load_official_roundtrip_and_errors():
    torch.manual_seed(0)
    src, dst = _tiny(), _tiny()
    sd = _official_like_state_dict(src)
    dst.load_official_state_dict(sd)
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    # the audio/vision swap lives in the mapping: official encoder_a (level 0) → our vision exchange block
    assert src.official_key_map()["hbf.levels.0.exchange.2.to_query.weight"] == \
        "HBF.encoder_a.0.layers.0.0.fn.to_query.weight"
    assert src.official_key_map()["hbf.levels.0.query_gather.to_k.1.weight"] == "HBF.encoder_q2tav.0.to_k_v.weight"

    bad = dict(sd)
    del bad["classifier.MLP.0.weight"]
    bad["HBF.extra.weight"] = torch.zeros(1)
    bad["temporal_alignment.to_q.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        dst.load_official_state_dict(bad)
    msg = str(err.value)
    assert "classifier.MLP.0.weight" in msg and "HBF.extra.weight" in msg and "temporal_alignment.to_q.weight" in msg
    alias = dict(sd)
    alias["text_encoder.projector.MLP.0.weight"] = alias["text_encoder.projector.MLP.0.weight"] + 1
    with pytest.raises(ValueError, match="MLP.0.weight"):
        dst.load_official_state_dict(alias)


# ---------------------------------------------------------------------------------------------------------------
# forward: exact savings, inputs
# ---------------------------------------------------------------------------------------------------------------
def _random_batch(model, b=5, text_lengths=(7, 3, 11, 1, 5), seed=0, width=13) -> Batch:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    lengths = torch.tensor(text_lengths[:b])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    a_len = torch.randint(1, c["audio_len"] + 1, (b,), generator=g)
    v_len = torch.randint(1, c["vision_len"] + 1, (b,), generator=g)
    a_len[0], v_len[-1] = c["audio_len"], 0  # one unpadded sample, one without any vision frame
    audio = torch.randn(b, c["audio_len"], c["audio_dim"], generator=g)
    vision = torch.randn(b, c["vision_len"], c["vision_dim"], generator=g)
    audio *= (torch.arange(c["audio_len"])[None] < a_len[:, None]).unsqueeze(-1)
    vision *= (torch.arange(c["vision_len"])[None] < v_len[:, None]).unsqueeze(-1)
    feats = torch.randn(b, width, c["text_dim"], generator=g) * mask.unsqueeze(-1)
    return Batch(text_ids=torch.randint(103, 999, (b, width), generator=g) * mask, text_attention_mask=mask,
                 text_segment_ids=torch.zeros_like(mask), audio=audio, vision=vision, audio_lengths=a_len,
                 vision_lengths=v_len, labels=torch.rand(b, generator=g) * 6 - 3, index=torch.arange(b),
                 text_features=feats)


@pytest.mark.parametrize("depth,lengths", [(2, (7, 3, 11, 1, 5)), (3, (4, 3, 2, 1, 5))])
def test_row_pruning_equals_straightforward_path(depth, lengths):
    """Computing only the kept bottleneck rows / last-level token 0 changes no number (forward and gradients)."""
    torch.manual_seed(1)
    pruned = _tiny(fusion_depth=depth).double()
    full = _tiny(fusion_depth=depth, prune_rows=False).double()
    full.load_state_dict(pruned.state_dict())
    batch = _random_batch(pruned, text_lengths=lengths)
    batch = batch.replace(audio=batch.audio.double(), vision=batch.vision.double(),
                          text_features=batch.text_features.double().transpose(1, 2).contiguous().transpose(1, 2))
    outs = []
    for m in (pruned, full):
        m.eval()
        out = m(batch)
        out["M"].square().sum().backward()
        outs.append((out, {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    (op, gp), (of, gf) = outs
    torch.testing.assert_close(op["M"], of["M"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op["hbf.fused"], of["hbf.fused"], rtol=1e-10, atol=1e-12)
    assert gp.keys() == gf.keys()
    for k in gp:
        torch.testing.assert_close(gp[k], gf[k], rtol=1e-9, atol=1e-12, msg=k)
    assert op[f"hbf.{depth - 1}.text.token0"].shape[1] == 1


def test_text_crop_to_batch_longest():
    """Extra all-padding columns do not change anything: the model crops to the longest text of the batch."""
    model = _tiny().eval()
    batch = _random_batch(model)
    wide = batch.replace(**{k: torch.nn.functional.pad(getattr(batch, k), (0, 6)) for k in
                            ("text_ids", "text_attention_mask", "text_segment_ids")},
                         text_features=torch.nn.functional.pad(batch.text_features, (0, 0, 0, 6)))
    with torch.no_grad():
        a, b = model(batch), model(wide)
    assert a["text_encoder.all"].shape[1] == 11
    torch.testing.assert_close(a["M"], b["M"], rtol=0, atol=0)


def test_missing_modalities_give_finite_outputs():
    model = _tiny().eval()
    batch = _random_batch(model)
    batch.text_attention_mask[1] = 0
    batch.text_features[1] = 0
    batch.audio[2] = 0
    batch.audio_lengths[2] = 0
    with torch.no_grad():
        out = model(batch)
    assert all(torch.isfinite(v).all() for v in out.values() if v.is_floating_point())


def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    batch = _random_batch(model)
    with pytest.raises(ValueError, match="batch.audio"):
        model(batch.replace(audio=batch.audio[:, :-1]))
    with pytest.raises(ValueError, match="batch.vision"):
        model(batch.replace(vision=batch.vision[..., :-1]))
    with pytest.raises(ValueError, match="text_features"):
        model(batch.replace(text_features=None))
    with pytest.raises(RuntimeError, match="prepare_epoch"):
        model.training_step(batch)
    with pytest.raises(ValueError, match="unknown config keys"):
        _tiny(not_a_key=1)


# ---------------------------------------------------------------------------------------------------------------
# contrastive objective
# ---------------------------------------------------------------------------------------------------------------
# The official indices_tuple (src/model/dashfusion.py), written out literally.
OFFICIAL_A1 = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 0, 0, 7, 7, 14, 14, 21, 21]
OFFICIAL_P = [7, 14, 8, 15, 9, 16, 10, 17, 11, 18, 12, 19, 13, 20, 1, 2, 8, 9, 15, 16, 22, 23]
OFFICIAL_A2 = [0, 0, 0, 0, 7, 7, 7, 7, 14, 14, 14, 14, 21, 21, 21, 21]
OFFICIAL_N = [3, 4, 5, 6, 10, 11, 12, 13, 17, 18, 19, 20, 24, 25, 26, 27]


def _official_loop_loss(anchor_feats, partner_feats, tau):
    """Per-anchor loop of the official formula: 28-row matrix, pml CosineSimilarity, NT-Xent pair loss with
    max-subtraction and small_val, MeanReducer over the 22 positive pairs, summed over anchors / B."""
    a1, p, a2, n = (torch.tensor(x) for x in (OFFICIAL_A1, OFFICIAL_P, OFFICIAL_A2, OFFICIAL_N))
    b = anchor_feats[0].shape[0]
    total = 0.0
    for i in range(b):
        x = torch.cat([torch.cat([f[i:i + 1], f2[6 * i:6 * (i + 1)]]) for f, f2 in zip(anchor_feats, partner_feats)])
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        mat = x @ x.T
        pos = mat[a1, p].unsqueeze(1) / tau
        neg = mat[a2, n] / tau
        n_per_p = (a2.unsqueeze(0) == a1.unsqueeze(1)).to(x.dtype)
        neg = neg * n_per_p
        neg[n_per_p == 0] = torch.finfo(x.dtype).min
        max_val = torch.max(pos, neg.max(dim=1, keepdim=True)[0]).detach()
        num = torch.exp(pos - max_val).squeeze(1)
        den = torch.exp(neg - max_val).sum(dim=1) + num
        total = total + (-torch.log(num / den + torch.finfo(x.dtype).tiny)).mean()
    return total / b


def test_pair_pattern_is_the_official_one():
    a1, p, a2, n = official_pair_indices()
    assert (a1.tolist(), p.tolist(), a2.tolist(), n.tolist()) == (OFFICIAL_A1, OFFICIAL_P, OFFICIAL_A2, OFFICIAL_N)


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_vectorised_ntxent_matches_official_loop(tau):
    g = torch.Generator().manual_seed(3)
    b, d = 6, 10
    anchors = [torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    partners = [torch.randn(6 * b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    # features (B, 4, 7, D) in the model's layout: family-major [t̄, v̄, ā, H̄] × [anchor, 6 partners]
    feats = torch.stack([torch.cat([a[:, None], p.view(b, 6, d)], dim=1) for a, p in zip(anchors, partners)], dim=1)
    ours = partner_ntxent_loss(feats, tau)
    ref = _official_loop_loss(anchors, partners, tau)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    g_ours = torch.autograd.grad(ours, anchors + partners)
    g_ref = torch.autograd.grad(ref, anchors + partners)
    for x, y in zip(g_ours, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="features"):
        partner_ntxent_loss(feats[:, :3], tau)


def test_draw_partners_reproducible_and_from_pools():
    n, k = 30, 10
    g = torch.Generator().manual_seed(0)
    pools = {kind: torch.randint(0, n, (n, k), generator=g) for kind in ("ss", "dd", "sd")}
    pools["ss"][4, 1:] = -1  # a single candidate → drawn twice
    pools["dd"][5] = -1  # no candidate → the anchor itself
    anchors = torch.tensor([3, 4, 5, 9])
    d1 = draw_partners(pools, anchors, 7).view(4, 6)
    d2 = draw_partners(pools, anchors, 7).view(4, 6)
    d3 = draw_partners(pools, anchors, 8).view(4, 6)
    assert torch.equal(d1, d2) and not torch.equal(d1, d3)
    for r, a in enumerate(anchors.tolist()):
        for j, kind in enumerate(("ss", "dd", "sd")):
            pair = d1[r, 2 * j:2 * j + 2].tolist()
            valid = [x for x in pools[kind][a].tolist() if x >= 0]
            if not valid:
                assert pair == [a, a]
            elif len(valid) == 1:
                assert pair == valid * 2
            else:
                assert set(pair) <= set(valid)
                pos = [pools[kind][a].tolist().index(x) for x in pair]
                assert pos[0] != pos[1]  # two different slots (without replacement)


def _split(model, n=24, seed=4):
    batch = _random_batch(model, b=5, seed=seed)
    rows = torch.arange(n) % 5
    split = select_rows(batch, rows).replace(index=torch.arange(n), labels=torch.linspace(-3, 3, n))
    g = torch.Generator().manual_seed(seed)
    return split.replace(audio=split.audio + 0.1 * torch.randn(split.audio.shape, generator=g),
                         text_features=split.text_features + 0.1 * torch.randn(split.text_features.shape,
                                                                                  generator=g))


def test_training_step_joint_pass_equals_separate_passes():
    """Anchors and partners share one encoder pass; results equal the official separate passes (each group
    cropped to its own longest text)."""
    torch.manual_seed(2)
    model = _tiny().double()
    split = _split(model)
    split = split.replace(audio=split.audio.double(), vision=split.vision.double(),
                          text_features=split.text_features.double(), labels=split.labels.double())
    model.prepare_epoch(1, split)
    model.eval()  # dropout off so both paths are deterministic
    anchors = select_rows(split, torch.tensor([0, 5, 9, 17]))
    losses = model.training_step(anchors)
    partner_rows = draw_partners(model.partner_pools, anchors.index, model.partner_draw_seed)
    partners = select_rows(split, partner_rows)
    with torch.no_grad():
        ea, ep = model(anchors), model.encode(partners)
    fam = lambda e: torch.stack([e["text_encoder.mean"], e["vision_encoder.mean"], e["audio_encoder.mean"],  # noqa
                                 e["temporal_alignment.H"][:, 0]], dim=1)
    feats = torch.cat([fam(ea)[:, None], fam(ep).view(4, 6, 4, -1)], dim=1).transpose(1, 2)
    expected = model.loss(anchors, {"M": ea["M"], "contrastive.features": feats})
    for key in ("loss", "pred_loss_mse", "const_loss"):
        torch.testing.assert_close(losses[key].detach(), expected[key], rtol=1e-10, atol=1e-12)
    assert expected["const_loss"] > 0
    torch.testing.assert_close(losses["M"], ea["M"], rtol=1e-10, atol=1e-12)


def test_prepare_epoch_refreshes_on_odd_epochs_only_and_draw_is_seeded():
    torch.manual_seed(0)
    model = _tiny()
    split = _split(model)
    model.prepare_epoch(1, split)
    pools1 = {k: v.clone() for k, v in model.partner_pools.items()}
    assert all(v.shape == (24, 10) for v in pools1.values())
    with torch.no_grad():
        for p in model.text_projector.parameters():
            p.add_(torch.randn_like(p))
    model.prepare_epoch(2, split)  # even epoch: pools kept
    assert all(torch.equal(pools1[k], model.partner_pools[k]) for k in pools1)
    draw_a = draw_partners(model.partner_pools, torch.arange(4), model.partner_draw_seed)
    model.prepare_epoch(2, split)
    draw_b = draw_partners(model.partner_pools, torch.arange(4), model.partner_draw_seed)
    assert torch.equal(draw_a, draw_b)  # the draw is a function of (partner_seed, epoch)
    # ... and of the anchor alone: drawn in another batch (other samples, other order) it gets the same partners
    draw_c = draw_partners(model.partner_pools, torch.tensor([3, 9, 1, 0, 2]), model.partner_draw_seed).view(5, 6)
    assert torch.equal(draw_c[[3, 2, 4, 0]], draw_a.view(4, 6))
    model.prepare_epoch(3, split)  # odd epoch: re-encoded with the changed weights
    assert any(not torch.equal(pools1[k], model.partner_pools[k]) for k in pools1)


@pytest.mark.parametrize("dataset,bug", [("mosi", False), ("mosi", True), ("mosei", False), ("sims", True)])
def test_prepare_epoch_pools_follow_the_official_scan(dataset, bug):
    """Pools = the official __pre_sample scan (loop reference) on pooled cat(t̄, v̄, ā) of the eval-mode encoders,
    with the dataset's label rounding and rank windows."""
    torch.manual_seed(0)
    model = _tiny(dataset=dataset, rank_index_bug=bug)
    split = _split(model)
    model.prepare_epoch(1, split)
    model.eval()
    with torch.no_grad():
        enc = model.encode(split, align=False)
    feats = torch.cat([enc["text_encoder.mean"], enc["vision_encoder.mean"], enc["audio_encoder.mean"]], dim=1)
    c = model.config
    labels = torch.round(split.labels) if dataset != "sims" else split.labels
    ref = official_partner_loop(feats, labels, k=10, rank_index_bug=bug, window_top=c["partner_window_top"],
                                window_bottom=c["partner_window_bottom"])
    for kind in ("ss", "sd", "dd"):
        assert torch.equal(model.partner_pools[kind], ref[kind]), kind


# ---------------------------------------------------------------------------------------------------------------
# it learns (synthetic MOSI, tiny config)
# ---------------------------------------------------------------------------------------------------------------
def _shrink(split: dict, n_frames: int, n_tokens: int) -> dict:
    """Keep the first frames / tokens (the planted signal is in every valid frame and token): a CPU-sized task."""
    out = dict(split)
    for m in ("audio", "vision"):
        out[m] = split[m][:, :n_frames]
        out[f"{m}_lengths"] = split[f"{m}_lengths"].clip(max=n_frames)
    out["text_bert"], out["text"] = split["text_bert"][:, :, :n_tokens], split["text"][:, :n_tokens]
    return out


def _train_and_eval(data, text_only: bool, epochs: int, seed: int = 0):
    """Train a tiny DashFusion with the full objective (partners, prepare_epoch) → (test MAE, predictions)."""
    from msa_fast.data.dataset import MMSADataset, make_loader

    frames = 12
    splits = {s: _shrink(data[s], frames, 12) for s in ("train", "test")}
    if text_only:  # the model's own text-only ablation: audio and vision removed
        for s in splits.values():
            s["audio"], s["vision"] = s["audio"] * 0, s["vision"] * 0
            s["audio_lengths"], s["vision_lengths"] = s["audio_lengths"] * 0, s["vision_lengths"] * 0
    torch.manual_seed(seed)
    model = build("dashfusion", dataset="mosi", use_text_features=True, d_model=32, encoder_heads=4,
                  encoder_ff_dim=64, ta_heads=4, ta_dim_head=8, fusion_heads=4, fusion_ff_dim=64, audio_layers=1,
                  vision_layers=1, audio_len=frames, vision_len=frames, partner_seed=seed, epochs=epochs)
    loader = make_loader(MMSADataset(splits["train"], use_text_features=True), batch_size=16, shuffle=True,
                         seed=seed)
    opt = torch.optim.AdamW(model.optimizer_param_groups(), lr=3e-3)
    for epoch in range(1, epochs + 1):
        model.prepare_epoch(epoch, loader)
        model.train()
        for batch in loader:
            opt.zero_grad()
            model.training_step(batch)["loss"].backward()
            opt.step()
    model.eval()
    test = MMSADataset(splits["test"], use_text_features=True)
    batch = test[list(range(len(test)))]
    with torch.no_grad():
        pred = model(batch)["M"]
    return (pred - batch.labels).abs().mean().item(), pred


@pytest.mark.slow
def test_it_learns_on_synthetic_mosi():
    from msa_fast.data.synthetic import synthetic

    data = synthetic("mosi", n_train=384, n_valid=0, n_test=128, seed=0, text_features=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mae, _ = _train_and_eval(data, text_only=False, epochs=3)
        mae_text, _ = _train_and_eval(data, text_only=True, epochs=3)
        small = {"train": {k: v[:48] for k, v in data["train"].items()}, "test": data["test"]}
        _, pred_a = _train_and_eval(small, text_only=False, epochs=2)
        _, pred_b = _train_and_eval(small, text_only=False, epochs=2)
    finally:
        torch.set_num_threads(threads)
    y = torch.as_tensor(data["test"]["regression_labels"]).float()
    mae_const = (y - torch.as_tensor(data["train"]["regression_labels"]).float().mean()).abs().mean().item()
    assert mae < 0.7 * mae_const, (mae, mae_const)
    assert mae < 0.9 * mae_text, (mae, mae_text)
    assert torch.equal(pred_a, pred_b)  # same seed → same numbers


def test_bench_factory_runs():
    from msa_fast.models.dashfusion.bench import setup

    model, batch = setup(batch_size=2)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert out["M"].shape == (2,) and torch.isfinite(out["M"]).all()


def test_trainer_resume_after_an_odd_epoch_reuses_the_saved_partner_pools(tmp_path):
    """Pools are built on odd epochs only: a run interrupted after epoch 1 and resumed must train epoch 2 with the
    epoch-1 pools (kept in last.pt via epoch_state), giving exactly the uninterrupted run's history."""
    from msa_fast.data.synthetic import synthetic
    from msa_fast.train import Trainer, TrainConfig

    data = synthetic("mosi", n_train=48, n_valid=16, n_test=16, seed=3, text_features=True)
    splits = {s: _shrink(data[s], 12, 12) for s in ("train", "valid", "test")}

    class Stop(Exception):
        pass

    def model():
        torch.manual_seed(0)
        return _tiny(audio_len=12, vision_len=12, epochs=3, text_dim=768, vision_dim=20)

    def trainer(ck, **kw):
        cfg = TrainConfig(epochs=3, batch_size=16, quiet=True, seed=5, early_stop=10, checkpoint_dir=str(ck),
                          **{k: v for k, v in kw.items() if k == "resume"})
        return Trainer(model(), splits["train"], splits["valid"], splits["test"], cfg,
                       on_epoch_end=kw.get("on_epoch_end"))

    full = trainer(tmp_path / "full").fit()

    def stop_after_1(trainer_, epoch, record):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        trainer(tmp_path / "cut", on_epoch_end=stop_after_1).fit()
    saved = torch.load(next((tmp_path / "cut").rglob("last.pt")), weights_only=True)
    assert set(saved["epoch_state"]["partner_pools"]) == {"ss", "sd", "dd"}
    torch.manual_seed(123)  # disturb the global RNG: resume restores it
    resumed = trainer(tmp_path / "cut", resume=True).fit()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full["history"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["history"]] == strip
    assert resumed["test"] == full["test"]
