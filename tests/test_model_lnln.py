"""LNLN: official parity (complete and erased views), weight loading, layer references in float64, the shared
complete pass (equality), the objective and its gradient flow, and "it learns"."""
from __future__ import annotations

import json
import math
from pathlib import Path
import pytest
import torch

from msa_fast.data.batch import Batch
from msa_fast.models import build
from msa_fast.models.lnln.layers import (HyperModalityLayer, PreNormHyper, TokenTransformer, grad_reverse)
from msa_fast.nn.text_encoder import TINY_BERT_CONFIG

from parity_fixtures import load_parity
MANIFEST = Path(__file__).resolve().parent / "manifests" / "lnln_mosi.json"
UNK = 100


@pytest.fixture(scope="module")
def fixture():
    return load_parity("lnln_mosi.pt")


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()


def assert_grads_close(got: dict, expected: dict, rel: float) -> None:
    """Per parameter max|a − e| ≤ rel·max|e| + 1e-3·rel·(largest gradient): the floor covers analytically-zero
    gradients (attention key biases cancel in the softmax) that hold only rounding noise."""
    assert got.keys() == expected.keys()
    scale = max(e.abs().max().item() for e in expected.values())
    for name, e in expected.items():
        err = (got[name].double() - e.double()).abs().max().item()
        assert err <= rel * e.abs().max().item() + 1e-3 * rel * scale, (name, err)


# ---------------------------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------------------------
def _fixture_batch(fx) -> Batch:
    x = fx["inputs_mmsa"]
    tb = x["text_bert"].long()
    n = x["regression_labels"].shape[0]
    return Batch(text_ids=tb[:, 0], text_attention_mask=tb[:, 1], text_segment_ids=tb[:, 2], audio=x["audio"],
                 vision=x["vision"], audio_lengths=x["audio_lengths"], vision_lengths=x["vision_lengths"],
                 labels=x["regression_labels"], index=torch.arange(n), ids=list(x["id"]),
                 raw_text=list(x["raw_text"]))


def erase(complete: Batch, text_keep: torch.Tensor, audio_keep: torch.Tensor, vision_keep: torch.Tensor,
          rates: torch.Tensor) -> Batch:
    """The incomplete view as the official ``generate_m`` makes it from keep masks: erased valid tokens → [UNK]
    (attention mask unchanged), erased frames → 0. ``rates`` (B, 3) drawn (text, audio, vision) rates."""
    valid = complete.text_attention_mask.bool()
    ids = torch.where(valid & ~text_keep, torch.full_like(complete.text_ids, UNK), complete.text_ids)
    return complete.replace(text_ids=ids, audio=complete.audio * audio_keep[..., None],
                            vision=complete.vision * vision_keep[..., None], text_keep_mask=text_keep,
                            audio_keep_mask=audio_keep, vision_keep_mask=vision_keep, missing_rates=rates,
                            complete=complete)


def _fixture_case(fx, name: str) -> tuple[Batch, dict]:
    case = fx if name == fx["case"] else fx["extra_cases"][name]
    batch = _fixture_batch(fx)
    er = case["inputs_official"]["erasure"]
    if er is not None:
        rates = torch.cat([er["missing_rate_l"], er["missing_rate_a"], er["missing_rate_v"]], dim=1)
        batch = erase(batch, er["text_keep_mask"], er["audio_keep_mask"], er["vision_keep_mask"], rates)
    return batch, case


def random_batch(b: int, lt: int, la: int, lv: int, da: int, dv: int, seed: int, erase_rows: int = 0,
                 text_features: bool = False) -> Batch:
    """Ragged random batch (first row fully padded audio/vision beyond 1 frame) with the last ``erase_rows`` rows
    token-erased (rate 0.5 in every modality), the others complete."""
    g = torch.Generator().manual_seed(seed)
    n_tok = torch.randint(4, lt + 1, (b,), generator=g)
    n_tok[0] = lt
    la_len = torch.randint(1, la + 1, (b,), generator=g)
    lv_len = torch.randint(1, lv + 1, (b,), generator=g)
    la_len[0], lv_len[0] = 1, 1
    pos = torch.arange(lt)[None]
    mask = (pos < n_tok[:, None]).long()
    ids = torch.randint(103, 1000, (b, lt), generator=g) * mask
    ids[:, 0] = 101
    ids[torch.arange(b), n_tok - 1] = 102
    audio = torch.randn(b, la, da, generator=g) * (torch.arange(la)[None] < la_len[:, None])[..., None]
    vision = torch.randn(b, lv, dv, generator=g) * (torch.arange(lv)[None] < lv_len[:, None])[..., None]
    feats = torch.randn(b, lt, 768, generator=g) * mask[..., None] if text_features else None
    complete = Batch(text_ids=ids, text_attention_mask=mask, text_segment_ids=torch.zeros_like(ids), audio=audio,
                     vision=vision, audio_lengths=la_len, vision_lengths=lv_len,
                     labels=torch.rand(b, generator=g) * 6 - 3, index=torch.arange(b), text_features=feats)
    if erase_rows == 0:
        return complete
    rates = torch.zeros(b, 3)
    rates[b - erase_rows:] = 0.5
    keep_t = torch.rand(b, lt, generator=g) > rates[:, :1]
    keep_t[:, 0] = True
    keep_t[torch.arange(b), n_tok - 1] = True
    keep_a = torch.rand(b, la, generator=g) > rates[:, 1:2]
    keep_v = torch.rand(b, lv, generator=g) > rates[:, 2:3]
    out = erase(complete, keep_t, keep_a, keep_v, rates)
    if text_features:  # erased tokens' features zeroed (a stand-in for precomputed features of the erased text)
        out = out.replace(text_features=feats * keep_t[..., None])
    return out


SMALL_BERT = dict(TINY_BERT_CONFIG, hidden_size=48, num_attention_heads=2, intermediate_size=64)
SHAPES = dict(text_len=10, audio_len=12, vision_len=14, audio_dim=5, vision_dim=7)


def tiny_model(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(bert=SMALL_BERT, hidden_dim=32, token_len=4, heads=2, dim_head=16, mlp_dim=32, hyper_heads=4,
               discriminator_hidden=16, **SHAPES)
    cfg.update(overrides)
    return build("lnln", dataset="mosi", **cfg)


def tiny_batch(seed: int = 0, b: int = 6, erase_rows: int = 3, text_features: bool = False) -> Batch:
    return random_batch(b, SHAPES["text_len"], SHAPES["audio_len"], SHAPES["vision_len"], SHAPES["audio_dim"],
                        SHAPES["vision_dim"], seed, erase_rows, text_features)


# ---------------------------------------------------------------------------------------------------------------
# parity with the official model
# ---------------------------------------------------------------------------------------------------------------
def test_fixture_erasure_rebuilds_official_inputs(fixture):
    batch, case = _fixture_case(fixture, "erased")
    inc, com = case["inputs_official"]["incomplete_input"], case["inputs_official"]["complete_input"]
    assert torch.equal(batch.text_bert, inc["text"]) and torch.equal(batch.complete.text_bert, com["text"])
    assert torch.equal(batch.audio, inc["audio"]) and torch.equal(batch.vision, inc["vision"])
    assert torch.equal(batch.complete.audio, com["audio"]) and torch.equal(batch.complete.vision, com["vision"])
    labels = case["inputs_official"]["labels"]["completeness_labels"][:, 0]
    assert torch.equal(tiny_model().completeness_labels(batch), labels)


@pytest.fixture(scope="module")
def official_model(fixture):
    model = build("lnln", dataset="mosi", bert=fixture["bert_config"])
    model.load_official_state_dict(fixture["state_dict"])
    return model.eval()


# "erased" with the default row reuse (only the 4 erased rows rerun BERT / compressors); "complete" with the
# official two full passes (with reuse it would take every complete feature from the incomplete pass).
@pytest.mark.slow
@pytest.mark.parametrize("case_name,share", [("erased", "auto"), ("complete", "never")])
def test_parity_with_official_outputs(fixture, official_model, case_name, share):
    model = official_model
    model.config["share_complete_pass"] = share
    batch, case = _fixture_case(fixture, case_name)
    with torch.no_grad():
        out = model(batch, auxiliary=True)
    for key, e in case["outputs"].items():
        items = [(f"{key}.{i}", t) for i, t in enumerate(e)] if isinstance(e, list) else [(key, e)]
        for k, t in items:
            a = out[k]
            assert a.numel() == t.numel(), k
            assert _rel(a.reshape(t.shape), t) <= 1e-4, (k, _rel(a.reshape(t.shape), t))
    if case_name == "erased":  # the evaluation call (no auxiliary branch) gives the same M and w
        with torch.no_grad():
            evaluation = model(batch)
        assert torch.equal(evaluation["M"], out["M"]) and torch.equal(evaluation["w"], out["w"])
        assert "rec_feats" not in evaluation
    losses = model.loss(batch, out)
    for k, v in case["loss_terms"].items():
        assert abs(losses[k].item() - v) <= 1e-4 * max(1.0, abs(v)), (k, losses[k].item(), v)


def test_state_dict_matches_official_manifest(fixture):
    manifest = json.loads(MANIFEST.read_text())["keys"]
    assert {k: list(v.shape) for k, v in fixture["state_dict"].items()} == manifest


def test_model_keys_and_shapes_match_manifest():
    """Runs without the fixture: our MOSI model has exactly the official key → shape set (tiny BERT)."""
    manifest = json.loads(MANIFEST.read_text())["keys"]
    model = build("lnln", dataset="mosi", bert=TINY_BERT_CONFIG)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest


def test_wrong_state_dict_is_rejected_with_the_offending_keys():
    model = tiny_model()
    sd = model.state_dict()
    bad = dict(sd)
    bad.pop("h_p")
    bad["dmml.9.weight"] = torch.zeros(1)
    bad["dmml.3.weight"] = torch.zeros(2, 32)
    with pytest.raises(ValueError) as err:
        model.load_official_state_dict(bad)
    msg = str(err.value)
    assert "h_p" in msg and "dmml.9.weight" in msg and "dmml.3.weight" in msg and "(1, 32)" in msg
    model.load_official_state_dict(sd)  # the right one loads
    # text-feature models ignore the official BERT weights
    feat = tiny_model(use_text_features=True, text_dim=48)
    feat.load_official_state_dict(sd)


def test_config_validation_and_bad_inputs():
    with pytest.raises(ValueError, match="share_complete_pass"):
        tiny_model(share_complete_pass="sometimes")
    with pytest.raises(ValueError, match="hyper_depth"):
        tiny_model(hyper_depth=4)
    model = tiny_model()
    batch = tiny_batch()
    with pytest.raises(ValueError, match="batch.audio"):
        model(batch.replace(audio=batch.audio[..., :3]))
    with pytest.raises(ValueError, match="built for at most"):
        model(batch.replace(vision=torch.zeros(6, 20, 7), complete=None))
    with pytest.raises(ValueError, match="same samples"):
        model(batch.replace(complete=batch.complete.replace(audio=batch.audio[:, :5])), auxiliary=True)
    with pytest.raises(ValueError, match="missing_rates"):
        model.loss(batch.replace(missing_rates=None), model(batch))


# ---------------------------------------------------------------------------------------------------------------
# layers against independent float64 references
# ---------------------------------------------------------------------------------------------------------------
def _ln(x, mod):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], mod.weight.double(), mod.bias.double(), mod.eps)


def _mha_ref(q, k, v, wq, wk, wv, wo, bo, heads):
    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)
    qh, kh, vh = split(q @ wq.T), split(k @ wk.T), split(v @ wv.T)
    p = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)
    o = (p @ vh).permute(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)
    return o @ wo.T + bo


def _token_transformer_ref(mod: TokenTransformer, x: torch.Tensor) -> torch.Tensor:
    d = lambda t: t.double()  # noqa: E731
    b = x.shape[0]
    if mod.extra_token is not None:
        x = torch.cat([d(mod.extra_token).expand(b, -1, -1), x], 1)
    x = x + d(mod.pos_embedding)[:, : x.shape[1]]
    for attn, ff in mod.encoder.layers:
        a = attn.fn
        x = x + _mha_ref(_ln(x, attn.norm_q), _ln(x, attn.norm_k), _ln(x, attn.norm_v), d(a.to_q.weight),
                         d(a.to_k.weight), d(a.to_v.weight), d(a.to_out[0].weight), d(a.to_out[0].bias), a.heads)
        n = ff.fn.net
        h = torch.nn.functional.gelu(_ln(x, ff.norm) @ d(n[0].weight).T + d(n[0].bias))
        x = x + h @ d(n[3].weight).T + d(n[3].bias)
    return x


def test_token_transformer_matches_float64_reference():
    torch.manual_seed(1)
    mod = TokenTransformer(num_frames=20, token_len=3, dim=16, depth=2, heads=2, mlp_dim=24, dim_head=12)
    with torch.no_grad():
        for p in mod.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 16, 13).transpose(1, 2).requires_grad_(True)  # (4, 13, 16) non-contiguous, 13 < 20 frames
    out = mod(x)
    ref = _token_transformer_ref(mod, x.double())
    assert out.shape == (4, 16, 16)
    assert _rel(out, ref) <= 1e-5
    g = torch.randn_like(ref)
    gx, gw = torch.autograd.grad(out, [x, mod.encoder.layers[0][0].fn.to_q.weight], g.float())
    gx_ref, gw_ref = torch.autograd.grad(ref, [x, mod.encoder.layers[0][0].fn.to_q.weight], g)
    assert _rel(gx, gx_ref) <= 1e-5 and _rel(gw, gw_ref) <= 1e-5


def test_hyper_layer_sums_two_softmaxes_and_normalises_h_hyper():
    torch.manual_seed(2)
    layer = PreNormHyper(16, HyperModalityLayer(16, heads=4, dim_head=4))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hd, ha, hv, hh = (torch.randn(3, n, 16, requires_grad=True) for n in (5, 7, 6, 5))
    out = layer(hd, ha, hv, hh)
    f, d = layer.fn, lambda t: t.double()  # noqa: E731
    q = _ln(d(hd), layer.norm1) @ d(f.to_q.weight).T
    a, v = _ln(d(ha), layer.norm2), _ln(d(hv), layer.norm3)

    def att(k, val):
        qs, ks, vs = (t.reshape(3, t.shape[1], 4, 4).transpose(1, 2) for t in (q, k, val))
        return (torch.softmax(qs @ ks.transpose(-1, -2) / 2.0, -1) @ vs).transpose(1, 2).reshape(3, -1, 16)
    shift = att(a @ d(f.to_k_ta.weight).T, a @ d(f.to_v_ta.weight).T) + \
        att(v @ d(f.to_k_tv.weight).T, v @ d(f.to_v_tv.weight).T)
    ref = _ln(d(hh), layer.norm4) + shift @ d(f.to_out[0].weight).T + d(f.to_out[0].bias)
    assert _rel(out, ref) <= 1e-5
    grads = torch.autograd.grad(out.sum(), [hd, ha, hv, hh])
    grads_ref = torch.autograd.grad(ref.sum(), [hd, ha, hv, hh])
    for g, r in zip(grads, grads_ref):
        assert _rel(g, r) <= 1e-5


def test_gradient_reversal():
    x = torch.randn(3, 4, requires_grad=True)
    (grad_reverse(x, 0.5) * 2).sum().backward()
    assert torch.equal(grad_reverse(x.detach(), 0.5), x.detach())
    assert torch.allclose(x.grad, torch.full_like(x, -1.0))


def test_model_float32_matches_float64():
    model = tiny_model(3)
    model.eval()
    batch = tiny_batch(3)
    out32 = model(batch, auxiliary=True)
    l32 = model.loss(batch, out32)["loss"]
    g32 = torch.autograd.grad(l32, list(model.parameters()), allow_unused=True)
    model.double()
    b64 = batch.replace(audio=batch.audio.double(), vision=batch.vision.double(), labels=batch.labels.double(),
                        complete=batch.complete.replace(audio=batch.complete.audio.double(),
                                                        vision=batch.complete.vision.double()))
    out64 = model(b64, auxiliary=True)
    l64 = model.loss(b64, out64)["loss"]
    g64 = torch.autograd.grad(l64, list(model.parameters()), allow_unused=True)
    for k in ("M", "w", "rec_feats", "effectiveness_discriminator_out"):
        assert _rel(out32[k], out64[k]) <= 1e-4, k
    assert abs(l32.item() - l64.item()) <= 1e-5 * abs(l64.item())
    names = [n for n, _ in model.named_parameters()]
    assert_grads_close({n: a for n, a in zip(names, g32) if a is not None},
                       {n: e for n, e in zip(names, g64) if e is not None}, 1e-3)


# ---------------------------------------------------------------------------------------------------------------
# the shared complete pass: same numbers, less work
# ---------------------------------------------------------------------------------------------------------------
def _forward_backward(model, batch):
    model.zero_grad()
    out = model(batch, auxiliary=True)
    losses = model.loss(batch, out)
    losses["loss"].backward()
    return out, losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _bert_batch_sizes(model) -> list[int]:
    sizes: list[int] = []
    model.bertmodel.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    return sizes


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("text_features", [False, True])
def test_shared_complete_pass_equals_two_full_passes(train_mode, text_features):
    """Rows identical in both views reuse the incomplete pass: outputs, losses and gradients unchanged."""
    kw = dict(use_text_features=True, text_dim=768) if text_features else \
        dict(bert=dict(SMALL_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    batch = tiny_batch(4, b=7, erase_rows=3, text_features=text_features)
    results = []
    for share in ("never", "auto"):
        model = tiny_model(4, share_complete_pass=share, **kw)
        model.train(train_mode)
        sizes = [] if text_features else _bert_batch_sizes(model)
        results.append((_forward_backward(model, batch), sizes))
    (out_a, loss_a, grad_a), sizes_never = results[0]
    (out_b, loss_b, grad_b), sizes_auto = results[1]
    if not text_features:
        assert sizes_never == [7, 7] and sizes_auto == [7, 3]  # only the 3 erased rows run BERT again
    for k in out_a:
        assert torch.allclose(out_a[k], out_b[k], rtol=1e-5, atol=1e-6), k
    for k in loss_a:
        assert torch.allclose(loss_a[k], loss_b[k], rtol=1e-6, atol=1e-7), k
    assert_grads_close(grad_b, grad_a, 1e-4)


def test_auto_sharing_keeps_official_dropout_noise_in_training():
    """With BERT dropout active, "auto" reruns BERT on every complete row (independent dropout masks)."""
    model = tiny_model(5)
    model.train()
    sizes = _bert_batch_sizes(model)
    model(tiny_batch(5, erase_rows=2))
    assert sizes == [6, 6]
    model.config["share_complete_pass"] = "always"
    sizes.clear()
    model(tiny_batch(5, erase_rows=2))
    assert sizes == [6, 2]


def test_complete_batch_reuses_everything_and_matches_two_passes():
    batch = tiny_batch(6, erase_rows=0)
    assert batch.complete is None
    outs = []
    for share in ("never", "auto"):
        model = tiny_model(6, share_complete_pass=share)
        model.eval()
        sizes = _bert_batch_sizes(model)
        outs.append(model(batch, auxiliary=True))
        assert sizes == ([6, 6] if share == "never" else [6])
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6), k
    assert torch.equal(outs[1]["complete_feats"], torch.cat([outs[1][k] for k in ("h_1_a", "h_1_v", "h_1_l")], 1))


# ---------------------------------------------------------------------------------------------------------------
# objective and gradient flow
# ---------------------------------------------------------------------------------------------------------------
def test_eval_call_matches_training_call_and_batch_of_one():
    model = tiny_model(7)
    model.eval()
    batch = tiny_batch(7, b=5, erase_rows=2)
    with torch.no_grad():
        full = model(batch, auxiliary=True)
        plain = model(batch)
        one = model(_select(batch, [3]), auxiliary=True)
    assert torch.equal(full["M"], plain["M"]) and torch.equal(full["w"], plain["w"])
    assert set(plain) < set(full) and "effectiveness_discriminator_out" not in plain
    assert one["M"].shape == (1,) and one["w"].shape == (1,)
    assert torch.allclose(one["M"], full["M"][3:4], rtol=1e-5, atol=1e-6)
    assert one["effectiveness_discriminator_out"].shape == (2 * 4, 2)
    for v in full.values():
        assert torch.isfinite(v).all()  # sample 0 has a single valid audio/vision frame


ROW_FIELDS = ("text_ids", "text_attention_mask", "text_segment_ids", "audio", "vision", "audio_lengths",
              "vision_lengths", "labels", "index", "text_keep_mask", "audio_keep_mask", "vision_keep_mask",
              "missing_rates")


def _select(batch: Batch, rows: list[int]) -> Batch:
    """The given rows of both views."""
    idx = torch.tensor(rows)

    def pick(b: Batch) -> Batch:
        return b.replace(**{k: getattr(b, k)[idx] for k in ROW_FIELDS if getattr(b, k) is not None})

    out = pick(batch)
    return out.replace(complete=pick(batch.complete)) if batch.complete is not None else out


def test_loss_terms_follow_the_official_definition():
    model = tiny_model(8)
    model.eval()
    batch = tiny_batch(8, b=6, erase_rows=3)
    out = model(batch, auxiliary=True)
    losses = model.loss(batch, out)
    target = 1 - batch.missing_rates[:, 0]
    assert torch.allclose(losses["l_cc"], ((out["w"] - target) ** 2).mean())
    assert torch.allclose(losses["l_sp"], ((out["M"] - batch.labels) ** 2).mean())
    logits = out["effectiveness_discriminator_out"]
    labels = torch.tensor([1] * 24 + [0] * 24)
    assert torch.allclose(losses["l_adv"], -torch.log_softmax(logits, -1)[torch.arange(48), labels].mean())
    assert torch.allclose(losses["l_rec"], ((out["rec_feats"] - out["complete_feats"]) ** 2).mean())
    expected = 0.9 * losses["l_cc"] + 0.8 * losses["l_adv"] + 0.1 * losses["l_rec"] + losses["l_sp"]
    assert torch.allclose(losses["loss"], expected)
    # evaluation: only l_cc and l_sp
    ev = model.loss(batch, model(batch))
    assert ev["l_adv"].item() == 0.0 and ev["l_rec"].item() == 0.0
    # realised completeness target: fraction of erasable tokens actually erased
    model.config["completeness_target"] = "realised"
    valid = batch.text_attention_mask.bool()
    frac = (valid & ~batch.text_keep_mask).sum(1).float() / (valid.sum(1) - 2)
    assert torch.allclose(model.completeness_labels(batch), 1 - frac)
    assert torch.equal(model.completeness_labels(batch)[:3], torch.ones(3))


def test_gradient_reversal_reaches_the_proxy_path_through_the_sentiment_loss():
    """Official placement: the GRL sits on h_1_p before the mix, so even l_sp's gradient into h_p is reversed,
    while the language path (h_1_l) gets the un-reversed gradient."""
    batch = tiny_batch(9, erase_rows=3)
    grads = {}
    for alpha in (1.0, -1.0):  # alpha = -1 turns the reversal into the identity
        model = tiny_model(9, grl_alpha=alpha)
        model.eval()
        out = model(batch)
        l_sp = model.loss(batch, out)["l_sp"]
        grads[alpha] = torch.autograd.grad(l_sp, [model.h_p, model.dmml[3].weight])
    assert torch.allclose(grads[1.0][0], -grads[-1.0][0], rtol=1e-5, atol=1e-8)
    assert grads[1.0][0].abs().sum() > 0
    assert torch.equal(grads[1.0][1], grads[-1.0][1])  # downstream of the reversal: untouched


def test_same_seed_same_numbers():
    a, b = tiny_model(10), tiny_model(10)
    batch = tiny_batch(10)
    a.eval(), b.eval()
    assert torch.equal(a(batch, auxiliary=True)["M"], b(batch, auxiliary=True)["M"])


def test_benchmark_factory_gives_an_erased_batch_with_its_complete_view():
    from msa_fast.models.lnln.bench import setup

    model, batch = setup(batch_size=2, audio_len=40, vision_len=30)  # shorter windows keep the smoke test cheap
    assert batch.complete is not None and batch.missing_rates.shape == (2, 3)
    assert batch.audio.shape == (2, 375, 5)  # synthetic MOSI shapes; cropped below to the configured windows
    batch = batch.replace(audio=batch.audio[:, :40], vision=batch.vision[:, :30],
                          complete=batch.complete.replace(audio=batch.complete.audio[:, :40],
                                                          vision=batch.complete.vision[:, :30]))
    losses = model.training_step(batch)
    assert set(losses) >= {"loss", "l_sp", "l_cc", "l_adv", "l_rec", "M"} and torch.isfinite(losses["loss"])


# ---------------------------------------------------------------------------------------------------------------
# it learns
# ---------------------------------------------------------------------------------------------------------------
FRAMES = 32  # audio/vision cropped to the first 32 frames: every valid synthetic frame carries the signal


def _train_and_test_mae(data, text_only: bool, seed: int = 0, epochs: int = 6) -> float:
    from msa_fast.data.dataset import make_loader
    from msa_fast.data.missing import TokenErasure

    torch.manual_seed(seed)
    model = build("lnln", dataset="mosi", use_text_features=True, hidden_dim=32, heads=2, dim_head=16, mlp_dim=32,
                  hyper_heads=4, discriminator_hidden=16, compressor_depth=1, proxy_depth=1, completeness_depth=1,
                  reconstructor_depth=1, fusion_depth=1, audio_len=FRAMES, vision_len=FRAMES)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)

    erasure = TokenErasure(seed=seed)  # LNLN's training schedule: half the rates 0, the others U(0, 1)

    def view(batch: Batch) -> Batch:
        audio, vision = batch.audio[:, :FRAMES], batch.vision[:, :FRAMES]
        if text_only:  # the text-only ablation: audio and vision carry nothing
            audio, vision = torch.zeros_like(audio), torch.zeros_like(vision)
        return batch.replace(audio=audio, vision=vision, audio_lengths=batch.audio_lengths.clamp_max(FRAMES),
                             vision_lengths=batch.vision_lengths.clamp_max(FRAMES))

    def erased(batch: Batch, epoch: int) -> Batch:
        out = erasure(batch, epoch=epoch)  # erases token ids; precomputed features of erased tokens → 0 here
        return out.replace(text_features=batch.text_features * out.text_keep_mask[..., None])

    for epoch in range(epochs):
        model.train()
        for batch in make_loader(data["train"], batch_size=32, shuffle=True, seed=seed + epoch):
            losses = model.training_step(erased(view(batch), epoch))
            opt.zero_grad()
            losses["loss"].backward()
            opt.step()
    model.eval()
    errors = []
    with torch.no_grad():
        for batch in make_loader(data["test"], batch_size=64):
            errors.append((model(view(batch))["M"] - batch.labels).abs())
    return torch.cat(errors).mean().item()


@pytest.mark.slow
def test_it_learns_beyond_the_mean_and_the_text_only_ablation():
    from msa_fast.data.synthetic import synthetic

    torch.set_num_threads(1)
    data = synthetic("mosi", n_train=192, n_valid=0, n_test=128, seed=0, text_features=True)
    mean = float(data["train"]["regression_labels"].mean())
    const_mae = float(abs(data["test"]["regression_labels"] - mean).mean())
    full = _train_and_test_mae(data, text_only=False)
    text_only = _train_and_test_mae(data, text_only=True)
    assert full < 0.8 * const_mae, (full, const_mae)
    assert full < text_only - 0.05, (full, text_only)
    # same seed → same numbers (one epoch keeps the check cheap)
    assert _train_and_test_mae(data, text_only=False, epochs=1) == _train_and_test_mae(data, False, epochs=1)


def test_tokens_only_compressor_equals_the_official_first_rows():
    """The last layer computing only the T summary rows gives the official all-rows output's first T rows (forward
    and parameter / input gradients): an algorithmic win that changes no number."""
    from msa_fast.models.lnln.layers import TokenTransformer

    torch.manual_seed(0)
    full = TokenTransformer(40, 8, 32, depth=2, heads=4, mlp_dim=16, dim_head=8).double()
    fast = TokenTransformer(40, 8, 32, depth=2, heads=4, mlp_dim=16, dim_head=8, tokens_only=True).double()
    fast.load_state_dict(full.state_dict())
    x = torch.randn(3, 37, 32, dtype=torch.float64, requires_grad=True)
    a, b = full(x)[:, :8], fast(x)
    assert b.shape == (3, 8, 32)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(a)
    ga = torch.autograd.grad(a, [x, *full.parameters()], g)
    gb = torch.autograd.grad(b, [x, *fast.parameters()], g)
    for u, w in zip(ga, gb):
        torch.testing.assert_close(w, u, rtol=1e-10, atol=1e-12)


def test_kept_rows_only_off_computes_every_row_with_the_same_numbers():
    """``kept_rows_only=False`` (the official work, used by the equal-work benchmark) and the default give the same
    loss and gradients on the same weights."""
    from msa_fast.models.registry import get_model_class

    fast, batch = get_model_class("lnln").bench_inputs(batch_size=2, use_text_features=True)
    full, _ = get_model_class("lnln").bench_inputs(batch_size=2, use_text_features=True, kept_rows_only=False)
    full.load_state_dict(fast.state_dict())
    fast, full, batch = fast.double(), full.double(), batch.to(torch.float64)
    for m in (fast, full):
        m.eval()
    la, lb = (m.loss(batch, m(batch, auxiliary=True))["loss"] for m in (fast, full))
    torch.testing.assert_close(lb, la, rtol=1e-10, atol=1e-12)
    ga = torch.autograd.grad(la, list(fast.parameters()), allow_unused=True)
    gb = torch.autograd.grad(lb, list(full.parameters()), allow_unused=True)
    for u, w in zip(ga, gb):
        if u is not None:
            torch.testing.assert_close(w, u, rtol=1e-8, atol=1e-10)
