"""HME: official parity (three availability cases), weight loading, layer references in float64, retrieval through
the sync-free op == the official loop (forward and gradients), evaluation flags (memory bank, VIB sampling),
missing-modality handling, the objective, and "it learns"."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import msa_fast.models.hme.model as hme_module
from msa_fast.data.alignment import word_align
from msa_fast.data.batch import Batch
from msa_fast.models import build
from msa_fast.models.hme.layers import CrossAttention, MulTEncoder
from msa_fast.nn.text_encoder import TINY_BERT_CONFIG
from msa_fast.retrieval.in_batch import official_loop_retrieve

from parity_fixtures import load_parity
MANIFEST = Path(__file__).resolve().parent / "manifests" / "hme_mosi.json"
MODS = ("l", "a", "v")


@pytest.fixture(scope="module")
def fixture():
    return load_parity("hme_mosi.pt")


def _rel(a: torch.Tensor, e: torch.Tensor) -> float:
    return ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30)).item()


def _overrides(fx) -> dict:
    """The fixture's official argparse values for every config key the model shares with it."""
    args = fx["config"]["args"]
    keys = ("d_l", "num_heads", "layers", "hyper_depth", "latent_layers", "num_latents", "similarity_threshold",
            "uncertainty_LB", "uncertainty_UB", "attn_dropout", "attn_dropout_a", "attn_dropout_v", "relu_dropout",
            "res_dropout", "embed_dropout", "dropout")
    return {k: args[k] for k in keys}


def _fixture_batch(fx, ps: torch.Tensor, aligned: bool = True) -> Batch:
    x = fx["inputs_mmsa"]
    tb = x["text_bert"].long()
    n = tb.shape[0]
    if aligned:
        audio, vision = x["audio_aligned"], x["vision_aligned"]
        la = lv = torch.full((n,), audio.shape[1])
    else:
        audio, vision, la, lv = x["audio"], x["vision"], x["audio_lengths"], x["vision_lengths"]
    return Batch(text_ids=tb[:, 0], text_attention_mask=tb[:, 1], text_segment_ids=tb[:, 2], audio=audio,
                 vision=vision, audio_lengths=la, vision_lengths=lv, labels=x["regression_labels"],
                 index=torch.arange(n), ids=list(x["id"]), availability=ps.bool())


def _cases(fx) -> dict:
    return {fx["case"]: fx, **fx["extra_cases"]}


@pytest.fixture(scope="module")
def official_model(fixture):
    model = build("hme", "mosi", bert=fixture["bert_config"], eval_retrieval="in_batch", **_overrides(fixture))
    model.load_official_state_dict(fixture["state_dict"])
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# parity with the official model
# ---------------------------------------------------------------------------------------------------------------
def test_fixture_aligned_features_are_word_align_of_the_frames(fixture):
    x = fixture["inputs_mmsa"]
    tl = x["text_bert"][:, 1].sum(1).long()
    for raw, lens, aligned in (("audio", "audio_lengths", "audio_aligned"), ("vision", "vision_lengths",
                                                                            "vision_aligned")):
        got = word_align(x[raw], x[lens], tl, out_len=50)
        torch.testing.assert_close(got, x[aligned], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case_name", ["full", "missing", "missing_mr0.2"])
def test_parity_with_official_outputs(fixture, official_model, case_name):
    case = _cases(fixture)[case_name]
    batch = _fixture_batch(fixture, case["inputs_official"]["ps"])
    with torch.no_grad():
        out = official_model(batch, details=True)
    expected = case["outputs"]
    assert _rel(out["M"], expected["M"].reshape(-1)) <= 1e-4
    for key, e in expected.items():
        got = out[key]
        if key.startswith("retrieval.neighbours"):
            assert torch.equal(got, e), key
        elif key.startswith("retrieval.cos"):
            eye = torch.eye(e.shape[0], dtype=torch.bool)
            assert torch.isneginf(got[eye]).all() and torch.isneginf(e[eye]).all()
            assert _rel(got[~eye], e[~eye]) <= 1e-4, key
        else:
            assert got.numel() == e.numel(), key
            assert _rel(got.reshape(e.shape), e) <= 1e-4, (key, _rel(got.reshape(e.shape), e))
    for m in MODS:  # rows that took the fallback mean: exactly the official ones
        fallback = (~out[f"retrieval.neighbours_{m}"].any(dim=1)).nonzero().flatten().tolist()
        assert fallback == list(case["retrieval_fallback_rows"][m])
    losses = official_model.loss(batch, out)
    for key, value in case["loss_terms"].items():
        assert math.isclose(float(losses[key]), value, rel_tol=1e-4), key


def test_parity_through_in_forward_word_alignment(fixture):
    model = build("hme", "mosi", bert=fixture["bert_config"], eval_retrieval="in_batch", alignment="word_align",
                  **_overrides(fixture))
    model.load_official_state_dict(fixture["state_dict"])
    case = fixture["extra_cases"]["missing"]
    with torch.no_grad():
        out = model.eval()(_fixture_batch(fixture, case["inputs_official"]["ps"], aligned=False))
    assert _rel(out["M"], case["outputs"]["M"].reshape(-1)) <= 1e-4


def test_state_dict_matches_official_manifest(fixture):
    manifest = json.loads(MANIFEST.read_text())["keys"]
    assert {k: list(v.shape) for k, v in fixture["state_dict"].items()} == manifest


def test_model_keys_and_shapes_match_manifest():
    manifest = json.loads(MANIFEST.read_text())
    model = build("hme", "mosi", bert=TINY_BERT_CONFIG, **manifest["overrides"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == manifest["keys"]
    # with precomputed text features the official bert.* keys are ignored, the rest must still match
    feats = build("hme", "mosi", use_text_features=True, **manifest["overrides"])
    assert {k: list(v.shape) for k, v in feats.state_dict().items()} == {
        k: v for k, v in manifest["keys"].items() if not k.startswith("bert.")}


def test_wrong_state_dict_is_rejected_with_the_offending_keys(fixture):
    model = build("hme", "mosi", bert=fixture["bert_config"], **_overrides(fixture))
    sd = dict(fixture["state_dict"])
    sd.pop("ATTN_T.fc_att.weight")
    sd["not_a_key"] = torch.zeros(1)
    sd["proj_a_1.weight"] = torch.zeros(96, 6, 1)
    with pytest.raises(ValueError) as err:
        model.load_official_state_dict(sd)
    msg = str(err.value)
    assert "ATTN_T.fc_att.weight" in msg and "not_a_key" in msg and "proj_a_1.weight" in msg
    full_depth = build("hme", "mosi", bert=fixture["bert_config"], use_text_features=False)
    with pytest.raises(ValueError, match="shape mismatches"):
        full_depth.load_official_state_dict(fixture["state_dict"])


# ---------------------------------------------------------------------------------------------------------------
# small random models and batches
# ---------------------------------------------------------------------------------------------------------------
SMALL_BERT = dict(TINY_BERT_CONFIG, hidden_size=48, num_attention_heads=2, intermediate_size=64)
TINY = dict(d_l=16, num_heads=2, layers=2, hyper_depth=2, latent_layers=2, num_latents=3, final_ffn_dim=32,
            text_len=12, audio_dim=5, vision_dim=7)


def tiny_model(seed: int = 0, **overrides) -> hme_module.HME:
    torch.manual_seed(seed)
    cfg = dict(TINY, bert=SMALL_BERT)
    cfg.update(overrides)
    return build("hme", dataset="mosi", **cfg)


def tiny_batch(b: int = 6, seed: int = 0, availability=None, lt: int = 12, frames: int = 20) -> Batch:
    """Ragged batch; audio / vision word-aligned from random frames (zero rows at [CLS], [SEP], padding)."""
    g = torch.Generator().manual_seed(seed)
    n_tok = torch.randint(4, lt + 1, (b,), generator=g)
    n_tok[0] = lt
    mask = (torch.arange(lt)[None] < n_tok[:, None]).long()
    ids = torch.randint(103, 1000, (b, lt), generator=g) * mask
    ids[:, 0] = 101
    ids[torch.arange(b), n_tok - 1] = 102
    la = torch.randint(1, frames + 1, (b,), generator=g)
    lv = torch.randint(1, frames + 1, (b,), generator=g)
    audio = torch.randn(b, frames, TINY["audio_dim"], generator=g)
    vision = torch.randn(b, frames, TINY["vision_dim"], generator=g)
    avail = None if availability is None else torch.tensor(availability, dtype=torch.bool)
    return Batch(text_ids=ids, text_attention_mask=mask, text_segment_ids=torch.zeros_like(ids),
                 audio=word_align(audio, la, n_tok, lt), vision=word_align(vision, lv, n_tok, lt),
                 audio_lengths=torch.full((b,), lt), vision_lengths=torch.full((b,), lt),
                 labels=torch.rand(b, generator=g) * 6 - 3, index=torch.arange(b), availability=avail)


MISSING = [[1, 1, 1], [0, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1]]


def test_config_validation_and_bad_inputs():
    with pytest.raises(ValueError, match="alignment"):
        tiny_model(alignment="nearest")
    with pytest.raises(ValueError, match="eval_retrieval"):
        tiny_model(eval_retrieval="faiss")
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(d_l=15)
    with pytest.raises(ValueError, match="layers"):
        tiny_model(layers=0)
    with pytest.raises(ValueError, match="no configuration for dataset"):
        build("hme", "sims")
    with pytest.raises(ValueError, match="unknown config keys"):
        build("hme", "mosi", not_a_key=1)
    model = tiny_model().eval()
    batch = tiny_batch()
    with pytest.raises(ValueError, match="word-aligned"):
        model(batch.replace(audio=torch.randn(6, 20, 5)))
    with pytest.raises(ValueError, match=r"batch.vision must be \(B, L, 7\)"):
        model(batch.replace(vision=torch.randn(6, 12, 3)))
    with pytest.raises(ValueError, match="availability"):
        model(batch.replace(availability=torch.ones(6, 2, dtype=torch.bool)))
    with pytest.raises(TypeError, match="Batch"):
        model({"audio": batch.audio})
    with pytest.raises(ValueError, match="text_features"):
        tiny_model(use_text_features=True, text_dim=24)(batch)


def test_memory_bank_must_be_built_before_bank_evaluation():
    model = tiny_model().eval()  # eval_retrieval="bank" is the default
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        model(tiny_batch())


# ---------------------------------------------------------------------------------------------------------------
# layers against float64 references
# ---------------------------------------------------------------------------------------------------------------
def test_mult_encoder_matches_fairseq_reference_in_float64():
    """Two layers: the reference recomputes the official time-first loop with F.multi_head_attention_forward,
    keys / values of every layer = LN0 of the *embedded input* (official quirk), positions from channel 0."""
    torch.manual_seed(0)
    d, heads, L, B = 8, 2, 7, 3
    enc = MulTEncoder(d, heads, 2, 0.5, 0.3, 0.3, 0.2).double().eval()
    for p in enc.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randn(B, L, d, dtype=torch.float64)
    x[1, 4:] = 0.0  # zero rows: no position
    x[0, 2, 0] = 0.0  # channel 0 == 0 alone also drops the position
    got = enc(x)

    half = d // 2  # the official table is built in float32, then cast
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    pos = torch.arange(1, L + 1, dtype=torch.float32)[:, None] * freq
    table = torch.cat([torch.sin(pos), torch.cos(pos)], dim=1).double()  # position t+1
    pe = torch.where((x[..., 0] != 0)[..., None], table[None], torch.zeros(()).double())
    x0 = (math.sqrt(d) * x + pe).transpose(0, 1)  # (L, B, d) as the official code
    q = x0
    for layer in enc.layers:
        ln0 = layer.layer_norms[0]
        a, _ = F.multi_head_attention_forward(
            ln0(q), ln0(x0), ln0(x0), d, heads, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias,
            None, None, False, 0.0, layer.self_attn.out_proj.weight, layer.self_attn.out_proj.bias,
            training=False, need_weights=False)
        q = q + a
        q = q + layer.fc2(F.relu(layer.fc1(layer.layer_norms[1](q))))
    expected = enc.layer_norm(q).transpose(0, 1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_single_token_cross_attention_shortcut_equals_full_attention():
    torch.manual_seed(0)
    attn = CrossAttention(12, 12, heads=3, dim_head=4).double()
    x = torch.randn(5, 4, 12, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(5, 1, 12, dtype=torch.float64, requires_grad=True)
    wrt = [x, ctx, attn.to_q.weight, attn.to_kv.weight, attn.to_out.weight]

    def grads(out):  # unused inputs (the dead Q / K path) have zero gradient either way
        gs = torch.autograd.grad(out.square().sum(), wrt, allow_unused=True)
        return [torch.zeros_like(w) if g is None else g for g, w in zip(gs, wrt)]

    fast = attn(x, context=ctx)
    g_fast = grads(fast)
    attn.single_token_shortcut = False
    full = attn(x, context=ctx)
    g_full = grads(full)
    torch.testing.assert_close(fast, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fast, g_full):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_float32_matches_float64():
    model = tiny_model(eval_retrieval="in_batch").eval()
    batch = tiny_batch(8, availability=MISSING)
    with torch.no_grad():
        out32 = model(batch)
        out64 = model.double()(batch.replace(audio=batch.audio.double(), vision=batch.vision.double()))
    for key in ("M", "H_l", "R_a", "E_S", "S_H", "final_encoder", "info_losses"):
        assert _rel(out32[key], out64[key]) <= 1e-4, key


def test_non_contiguous_inputs_give_the_same_outputs():
    model = tiny_model(eval_retrieval="in_batch").eval()
    batch = tiny_batch(6, availability=MISSING[:6])
    nc = batch.replace(audio=batch.audio.transpose(1, 2).contiguous().transpose(1, 2),
                       vision=batch.vision.transpose(0, 1).contiguous().transpose(0, 1),
                       availability=batch.availability.t().contiguous().t())
    assert not nc.audio.is_contiguous() and not nc.vision.is_contiguous()
    with torch.no_grad():
        torch.testing.assert_close(model(nc)["M"], model(batch)["M"])


# ---------------------------------------------------------------------------------------------------------------
# the algorithmic win: retrieval through the single op == the official per-row loop
# ---------------------------------------------------------------------------------------------------------------
def _loop_retrieve(h, available=None, threshold=0.6, backend="auto", return_similarity=False):
    assert available is None
    return official_loop_retrieve(h, threshold), {}


def test_retrieval_op_equals_official_loop_forward_and_gradients(monkeypatch):
    model = tiny_model(eval_retrieval="in_batch").double().eval()
    batch = tiny_batch(8, seed=3, availability=MISSING)
    batch = batch.replace(audio=batch.audio.double(), vision=batch.vision.double())
    with torch.no_grad():
        probe = model(batch, details=True)
    # a threshold in the widest gap between observed cosines near their median, so both neighbour rows and fallback
    # rows occur and no decision sits on the threshold (the op compares float32 cosines, the loop float64)
    off = torch.cat([probe[f"retrieval.cos_{m}"][~torch.eye(8, dtype=torch.bool)] for m in MODS]).sort().values
    mid = slice(len(off) // 4, 3 * len(off) // 4)
    gaps = off[1:][mid] - off[:-1][mid]
    i = int(gaps.argmax()) + mid.start
    assert gaps.max() > 1e-4
    model.config["similarity_threshold"] = float(off[i] + off[i + 1]) / 2

    def run():
        model.zero_grad()
        out = model(batch, details=False)
        model.loss(batch, out)["loss"].backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_op, grads_op = run()
    with torch.no_grad():
        nb = model(batch, details=True)["retrieval.neighbours_l"]
    assert nb.any() and not nb.any(dim=1).all()  # both kinds of rows are exercised
    monkeypatch.setattr(hme_module, "in_batch_retrieve", _loop_retrieve)
    out_loop, grads_loop = run()
    for key in ("R_l", "R_a", "R_v", "M"):
        torch.testing.assert_close(out_op[key], out_loop[key], rtol=1e-10, atol=1e-12)
    assert grads_op.keys() == grads_loop.keys()
    for name, g in grads_op.items():
        torch.testing.assert_close(g, grads_loop[name], rtol=1e-8, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# missing modalities, evaluation flags
# ---------------------------------------------------------------------------------------------------------------
def test_missing_text_is_zeroed_after_bert_and_audio_vision_before_projection():
    model = tiny_model(eval_retrieval="in_batch").eval()
    batch = tiny_batch(8, availability=MISSING)
    with torch.no_grad():
        out = model(batch)
        ref = model(batch.replace(availability=None))
        zeroed = model(batch.replace(availability=None, audio=batch.audio * torch.tensor(
            [r[1] for r in MISSING])[:, None, None].float(), vision=batch.vision * torch.tensor(
            [r[2] for r in MISSING])[:, None, None].float()))
    torch.testing.assert_close(out["bert.last_hidden_state"], ref["bert.last_hidden_state"])  # BERT reads the text
    torch.testing.assert_close(out["mult_a"], zeroed["mult_a"])
    torch.testing.assert_close(out["mult_v"], zeroed["mult_v"])
    # a missing text row's encoder output equals that of an all-zero input (no positions, constant rows)
    missing_text = [i for i, r in enumerate(MISSING) if r[0] == 0]
    rows = out["mult_l"][:, missing_text]
    torch.testing.assert_close(rows, rows[:1, :1].expand_as(rows))


@pytest.mark.parametrize("pattern", [[0, 1, 1], [1, 0, 0], [0, 0, 1]])
def test_a_modality_missing_in_every_sample_gives_finite_outputs_and_gradients(pattern):
    model = tiny_model(eval_retrieval="in_batch").train()
    batch = tiny_batch(6, availability=[pattern] * 6)
    losses = model.training_step(batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_bank_evaluation_is_independent_of_the_evaluation_batch():
    model = tiny_model()
    train = tiny_batch(16, seed=1)
    model.train()
    model.prepare_epoch(0, train)
    model.training_step(train)["loss"].backward()
    model.eval()
    test = tiny_batch(8, seed=2, availability=MISSING)
    keys = ("R_l", "R_a", "R_v", "M")

    def whole_and_split():
        whole = model(test)
        parts = [model(_rows(test, slice(0, 3))), model(_rows(test, slice(3, 8)))]
        return whole, {k: torch.cat([p[k] for p in parts]) for k in keys}

    with torch.no_grad():
        whole, split = whole_and_split()
        assert model.bank.num_samples == 16 and not model._bank_stale
        assert all(bool(model.bank.available[m].all()) for m in MODS)
        model.config["eval_retrieval"] = "in_batch"  # official: transductive
        whole_ib, split_ib = whole_and_split()
    for k in keys:
        torch.testing.assert_close(whole[k], split[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(whole_ib["R_a"], split_ib["R_a"], rtol=1e-5, atol=1e-6)


def test_bank_is_rebuilt_after_training_steps_and_equals_an_explicit_build():
    model = tiny_model()
    train = tiny_batch(10, seed=1)
    model.prepare_epoch(0, train)
    model.eval()
    with torch.no_grad():
        model(tiny_batch(4, seed=2))
    first = _bank_values(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.training_step(train)["loss"].backward()
    opt.step()
    assert model._bank_stale
    model.eval()
    with torch.no_grad():
        model(tiny_batch(4, seed=2))
    assert not torch.allclose(first, _bank_values(model))
    lazily = _bank_values(model)
    model.build_memory_bank([_rows(train, slice(4, 10)), _rows(train, slice(0, 4))])  # any order, keyed by index
    torch.testing.assert_close(_bank_values(model), lazily)


def _bank_values(model) -> torch.Tensor:
    """(N, 3, d) copy of the bank's stored H_l/a/v."""
    return torch.stack([model.bank.storage[m] for m in MODS], dim=1).clone()


def _bank_reference(keys, ok, queries, threshold):
    """HME's bank rule per query in float64: mean of the available rows with cos ≥ threshold, else (or when the
    query's entry sum is 0) the mean of the available rows with non-zero entry sum."""
    keys, queries = keys.double(), queries.double()
    cos = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    fallback = keys[ok & (keys.sum(1) != 0)].mean(0)
    out = []
    for i in range(len(queries)):
        sel = ok & (cos[i] >= threshold)
        out.append(keys[sel].mean(0) if sel.any() and queries[i].sum() != 0 else fallback)
    return torch.stack(out), cos


def test_bank_retrieval_matches_float64_reference_and_never_retrieves_a_missing_modality():
    model = tiny_model().eval()
    train = tiny_batch(12, seed=3, availability=MISSING + MISSING[:4])
    test = tiny_batch(8, seed=4, availability=MISSING[::-1])
    with torch.no_grad():
        model.build_memory_bank(train)
        keys = model.encode(train)
        queries = model.encode(test)
    ok = train.availability
    for i, m in enumerate(MODS):
        assert model.bank.available[m].tolist() == ok[:, i].tolist()
        torch.testing.assert_close(model.bank.storage[m], keys[f"H_{m}"])
    # a threshold between two observed cosines (no float32 / float64 tie), so that some queries fall back
    cos_all = torch.cat([_bank_reference(keys[f"H_{m}"], ok[:, i], queries[f"H_{m}"], 0.0)[1].flatten()
                         for i, m in enumerate(MODS)]).sort().values
    mid = len(cos_all) * 3 // 4
    threshold = float(cos_all[mid - 1] + cos_all[mid]) / 2
    model.config["similarity_threshold"] = threshold
    with torch.no_grad():
        out = model(test, details=True)
    n_fallback = 0
    for i, m in enumerate(MODS):
        ref, cos = _bank_reference(keys[f"H_{m}"], ok[:, i], queries[f"H_{m}"], threshold)
        torch.testing.assert_close(out[f"R_{m}"].double(), ref, rtol=1e-5, atol=1e-6)
        neighbours = out[f"retrieval.neighbours_{m}"]
        assert not neighbours[:, ~ok[:, i]].any()  # a missing modality is never retrieved
        assert torch.equal(neighbours, (cos >= threshold) & ok[:, i])
        n_fallback += int((~neighbours.any(1)).sum())
    assert 0 < n_fallback < 24


def test_bank_with_a_modality_missing_in_every_training_sample_gives_zero_retrieval():
    model = tiny_model().eval()
    with torch.no_grad():
        model.build_memory_bank(tiny_batch(6, seed=3, availability=[[1, 0, 1]] * 6))
        out = model(tiny_batch(4, seed=4))
    assert torch.equal(out["R_a"], torch.zeros_like(out["R_a"])) and torch.isfinite(out["M"]).all()
    assert out["R_l"].abs().sum() > 0


def _rows(batch: Batch, sl: slice) -> Batch:
    changes = {k: getattr(batch, k)[sl] for k in ("text_ids", "text_attention_mask", "text_segment_ids", "audio",
                                                   "vision", "audio_lengths", "vision_lengths", "labels", "index")}
    if batch.availability is not None:
        changes["availability"] = batch.availability[sl]
    return batch.replace(**changes)


def test_vib_sampling_at_evaluation_is_a_flag():
    model = tiny_model(eval_retrieval="in_batch").eval()
    batch = tiny_batch(6)
    with torch.no_grad():
        a, b = model(batch), model(batch)
        torch.testing.assert_close(a["M"], b["M"], rtol=0, atol=0)
        torch.testing.assert_close(a["vib_l.encoding"], a["vib_l.mu"], rtol=0, atol=0)
        model.config["vib_sample_at_eval"] = True
        c = model(batch)
    assert not torch.allclose(c["vib_l.encoding"], c["vib_l.mu"])
    torch.testing.assert_close(c["vib_l.mu"], a["vib_l.mu"])


def test_per_modality_attention_dropout_is_opt_in():
    official = tiny_model()
    assert {enc.layers[0].self_attn.attn_dropout for enc in (official.l2l, official.a2a, official.v2v)} == {0.5}
    fixed = tiny_model(per_modality_attn_dropout=True)
    assert [e.layers[0].self_attn.attn_dropout for e in (fixed.l2l, fixed.a2a, fixed.v2v)] == [0.5, 0.2, 0.0]


# ---------------------------------------------------------------------------------------------------------------
# objective
# ---------------------------------------------------------------------------------------------------------------
def test_loss_terms_follow_the_official_definition():
    model = tiny_model(eval_retrieval="in_batch").eval()
    batch = tiny_batch(6, availability=MISSING[:6])
    with torch.no_grad():
        out = model(batch)
        losses = model.loss(batch, out)
    y = batch.labels
    task = (out["M"] - y).abs().mean()
    uni = sum((out[f"vib_{m}.logits"][:, 0] - y).abs().mean() for m in MODS) / 3
    kl = sum(0.5 * (out[f"vib_{m}.mu"] ** 2 + out[f"vib_{m}.std"] ** 2 - 2 * out[f"vib_{m}.std"].log() - 1).mean()
             for m in MODS) / 3
    torch.testing.assert_close(losses["loss_task_l1"], task)
    torch.testing.assert_close(losses["loss_unimodal_l1_mean"], uni)
    torch.testing.assert_close(losses["info_losses_kl"], kl)
    torch.testing.assert_close(losses["loss"], task + 0.8 * uni + 0.01 * kl)


def test_official_configs():
    mosi = build("hme", "mosi", use_text_features=True)
    assert len(mosi.l2l.layers) == 4 and len(mosi.latent_text.layers) == 4 and len(mosi.hyper_l.layers) == 3
    assert mosi.proj_a_1.weight.shape == (192, 5, 1) and mosi.proj_v_1.weight.shape == (192, 20, 1)
    mosei = hme_module.HME.CONFIGS["mosei"]
    assert (mosei["layers"], mosei["latent_layers"], mosei["missing_rate"]) == (2, 3, 0.1)


# ---------------------------------------------------------------------------------------------------------------
# it learns
# ---------------------------------------------------------------------------------------------------------------
def _train_and_eval(data, text_only: bool, seed: int = 0, epochs: int = 5) -> float:
    from msa_fast.data.dataset import make_loader

    model = tiny_model(seed, use_text_features=True, text_len=50, alignment="aligned", d_l=16, layers=1,
                       hyper_depth=1, latent_layers=1, embed_dropout=0.0, attn_dropout=0.0, res_dropout=0.0,
                       relu_dropout=0.0, gate_dropout=0.0, dropout=0.0, final_dropout=0.0, audio_dim=5,
                       vision_dim=20)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def view(b: Batch) -> Batch:
        if not text_only:
            return b
        return b.replace(availability=torch.tensor([[True, False, False]]).expand(b.batch_size, 3))

    model.train()
    model.prepare_epoch(0, make_loader(data["train"], batch_size=128))
    for epoch in range(epochs):
        for batch in make_loader(data["train"], batch_size=32, shuffle=True, seed=seed + epoch):
            losses = model.training_step(view(batch))
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
    data = synthetic("mosi", n_train=256, n_valid=0, n_test=128, seed=0, aligned=True, text_features=True)
    mean = float(data["train"]["regression_labels"].mean())
    const_mae = float(abs(data["test"]["regression_labels"] - mean).mean())
    full = _train_and_eval(data, text_only=False)
    text_only = _train_and_eval(data, text_only=True)
    assert _train_and_eval(data, False, epochs=1) == _train_and_eval(data, False, epochs=1)  # same seed, same numbers
    assert full < 0.8 * const_mae, (full, const_mae)
    assert full < text_only, (full, text_only)


def test_optimizer_groups_follow_the_official_no_decay_rule():
    """Official train.py: AdamW without weight decay on names containing 'bias' or 'LayerNorm.weight' (BERT's), the
    configured decay (1e-4) on everything else — HME's own layer norms included."""
    model = build("hme", dataset="mosi", bert=dict(TINY_BERT_CONFIG))
    decay, no_decay = model.optimizer_param_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == pytest.approx(1e-4) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    off = {names[id(p)] for p in no_decay["params"]}
    assert "bert.embeddings.LayerNorm.weight" in off and "l2l.layers.0.layer_norms.0.bias" in off
    assert all("bias" in n or "LayerNorm.weight" in n for n in off)
    assert "l2l.layers.0.layer_norms.0.weight" in {names[id(p)] for p in decay["params"]}
