"""Missing-modality protocols: rates, rules, batch/order independence, official-algorithm parity."""
import os
import random

import numpy as np
import pytest
import torch

from msa_fast.data import Batch, MMSADataset, synthetic
from msa_fast.data.missing import (
    INCOMPLETE_PATTERNS, PATTERNS, ModalityDrop, PatternAvailability, TokenErasure, generate_missing_matrix,
    hash_uniform, official_lnln_generate_m, official_lnln_masks, official_lnln_train_rates, parse_missing,
)
from msa_fast.ops.masked_mean import masked_mean
from parity_fixtures import parity_path

LNLN_FIXTURE = str(parity_path("lnln_mosi.pt"))
HME_FIXTURE = str(parity_path("hme_mosi.pt"))


def make_batch(n=3000, lt=20, la=30, lv=25, seed=0) -> Batch:
    """A small random batch with ragged lengths (some full, some minimal)."""
    g = torch.Generator().manual_seed(seed)
    tlen = torch.randint(3, lt + 1, (n,), generator=g)
    tlen[0] = lt
    pos = torch.arange(lt)[None, :]
    mask = (pos < tlen[:, None]).long()
    ids = torch.randint(103, 1000, (n, lt), generator=g)
    ids[:, 0] = 101
    ids = torch.where(pos == tlen[:, None] - 1, torch.full_like(ids, 102), ids) * mask
    alen = torch.randint(1, la + 1, (n,), generator=g)
    vlen = torch.randint(1, lv + 1, (n,), generator=g)
    audio = torch.randn(n, la, 2, generator=g) * (torch.arange(la)[None, :] < alen[:, None])[..., None]
    vision = torch.randn(n, lv, 3, generator=g) * (torch.arange(lv)[None, :] < vlen[:, None])[..., None]
    return Batch(text_ids=ids, text_attention_mask=mask, text_segment_ids=torch.zeros_like(ids), audio=audio,
                 vision=vision, audio_lengths=alen, vision_lengths=vlen, labels=torch.randn(n, generator=g),
                 index=torch.arange(n), ids=[str(i) for i in range(n)], raw_text=[""] * n)


def subset(batch: Batch, rows) -> Batch:
    rows = torch.as_tensor(rows)
    changes = {f: getattr(batch, f)[rows] for f in ("text_ids", "text_attention_mask", "text_segment_ids", "audio",
                                                     "vision", "audio_lengths", "vision_lengths", "labels", "index")}
    return batch.replace(**changes, ids=[batch.ids[i] for i in rows.tolist()], raw_text=[""] * len(rows))


@pytest.fixture(scope="module")
def batch():
    return make_batch()


# ---- counter-based RNG ----------------------------------------------------------------------------------
def test_hash_uniform_pure_and_uniform():
    idx = torch.arange(20000)
    u = hash_uniform(5, "train", 0, idx, 1, 2, positions=8)
    assert u.shape == (20000, 8) and u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert torch.equal(u, hash_uniform(5, "train", 0, idx, 1, 2, positions=8))
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (hist - 0.1).abs().max() < 0.005
    for other in (hash_uniform(6, "train", 0, idx, 1, 2, positions=8), hash_uniform(5, "valid", 0, idx, 1, 2,
                  positions=8), hash_uniform(5, "train", 1, idx, 1, 2, positions=8),
                  hash_uniform(5, "train", 0, idx, 1, 3, positions=8)):
        assert abs(np.corrcoef(u.flatten().numpy(), other.flatten().numpy())[0, 1]) < 0.01
    assert abs(np.corrcoef(u[:, 0].numpy(), u[:, 1].numpy())[0, 1]) < 0.03  # neighbouring positions
    assert abs(np.corrcoef(u[:-1, 0].numpy(), u[1:, 0].numpy())[0, 1]) < 0.03  # neighbouring samples


# ---- (a) TokenErasure ----------------------------------------------------------------------------------
def test_erasure_rules(batch):
    out = TokenErasure(rate=0.5, seed=1)(batch)
    valid = batch.text_attention_mask.bool()
    n_tok = batch.text_lengths
    rows = torch.arange(batch.batch_size)
    assert out.text_keep_mask[:, 0].all() and out.text_keep_mask[rows, n_tok - 1].all()  # [CLS], [SEP]
    assert not out.text_keep_mask[~valid].any() and not out.audio_keep_mask[batch.audio_padding_mask].any()
    expected_ids = torch.where(valid & ~out.text_keep_mask, torch.full_like(batch.text_ids, 100), batch.text_ids)
    assert torch.equal(out.text_ids, expected_ids)
    assert torch.equal(out.text_attention_mask, batch.text_attention_mask)
    assert torch.equal(out.audio, batch.audio * out.audio_keep_mask[..., None])
    assert torch.equal(out.vision, batch.vision * out.vision_keep_mask[..., None])
    assert out.complete is batch and out.missing_rates.shape == (batch.batch_size, 3)
    assert torch.equal(out.missing_rates, torch.full((batch.batch_size, 3), 0.5))
    assert (batch.text_ids != 100).all()  # the input batch is not modified


def test_erasure_zeroes_erased_text_features(batch):
    feats = torch.randn(*batch.text_ids.shape, 8)
    with_feats = batch.replace(text_features=feats)
    out = TokenErasure(rate=0.5, seed=1)(with_feats)
    erased = batch.text_attention_mask.bool() & ~out.text_keep_mask
    assert erased.any() and (out.text_features[erased] == 0).all()
    assert torch.equal(out.text_features[~erased], feats[~erased])


def test_erasure_realised_rates(batch):
    valid_t = batch.text_attention_mask.bool().clone()
    valid_t[:, 0] = False
    valid_t[torch.arange(batch.batch_size), batch.text_lengths - 1] = False  # [SEP]
    for rate in (0.0, 0.3, 0.5, 0.9, 1.0):
        out = TokenErasure(rate=rate, seed=2)(batch)
        dropped_t = (~out.text_keep_mask[valid_t]).float().mean().item()
        dropped_a = (~out.audio_keep_mask[~batch.audio_padding_mask]).float().mean().item()
        dropped_v = (~out.vision_keep_mask[~batch.vision_padding_mask]).float().mean().item()
        for d in (dropped_t, dropped_a, dropped_v):
            assert abs(d - rate) < 0.01, (rate, d)


def test_erasure_training_schedule(batch):
    out = TokenErasure(rate=None, seed=3)(batch, epoch=0)
    r = out.missing_rates
    zero = (r == 0).float().mean(0)
    assert ((zero - 0.5).abs() < 0.03).all()
    nonzero = r[r > 0]
    assert abs(nonzero.mean().item() - 0.5) < 0.02 and nonzero.max() < 1
    # rates differ per modality and per epoch
    assert (r[:, 0] != r[:, 1]).float().mean() > 0.5
    again = TokenErasure(rate=None, seed=3)(batch, epoch=1)
    assert (again.missing_rates != r).any()
    text_valid = batch.text_attention_mask.bool()
    realised = 1 - (out.text_keep_mask & text_valid).sum(1) / text_valid.sum(1)
    assert np.corrcoef(realised.numpy(), r[:, 0].numpy())[0, 1] > 0.7
    only_text = TokenErasure(rate=0.5, modalities=("text",))(batch)
    assert (only_text.missing_rates[:, 1:] == 0).all() and torch.equal(only_text.audio, batch.audio)
    per_mod = TokenErasure(rates=(0.1, 0.2, 0.3))(batch)
    assert torch.allclose(per_mod.missing_rates[0], torch.tensor([0.1, 0.2, 0.3]))


def test_erasure_batch_and_order_independent(batch):
    proto = TokenErasure(rate=None, seed=11)
    full = proto(batch, epoch=4)
    perm = torch.randperm(batch.batch_size, generator=torch.Generator().manual_seed(0))
    parts = [proto(subset(batch, p), epoch=4) for p in torch.split(perm, 37)]
    keep_t = torch.cat([p.text_keep_mask for p in parts])
    keep_v = torch.cat([p.vision_keep_mask for p in parts])
    rates = torch.cat([p.missing_rates for p in parts])
    assert torch.equal(keep_t, full.text_keep_mask[perm]) and torch.equal(keep_v, full.vision_keep_mask[perm])
    assert torch.equal(rates, full.missing_rates[perm])
    assert not torch.equal(proto(batch, epoch=5).text_keep_mask, full.text_keep_mask)
    assert not torch.equal(proto(batch, epoch=4, split="test").text_keep_mask, full.text_keep_mask)


def test_erasure_masks_nested_across_rates(batch):
    low, high = TokenErasure(rate=0.2, seed=9)(batch), TokenErasure(rate=0.7, seed=9)(batch)
    assert not (high.audio_keep_mask & ~low.audio_keep_mask).any()  # kept at 0.7 ⇒ kept at 0.2


def test_full_erasure_no_nan(batch):
    out = TokenErasure(rate=1.0)(batch)
    assert (out.audio == 0).all() and (out.vision == 0).all()
    pooled = masked_mean(out.audio, out.audio_keep_mask)
    assert torch.isfinite(pooled).all() and (pooled == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_device_independent(batch):
    proto = TokenErasure(rate=None, seed=1)
    cpu = proto(batch, epoch=2)
    gpu = proto(batch.to("cuda"), epoch=2)
    assert torch.equal(gpu.text_keep_mask.cpu(), cpu.text_keep_mask)
    assert torch.equal(gpu.missing_rates.cpu(), cpu.missing_rates)
    drop = ModalityDrop(0.3)
    assert torch.equal(drop(batch.to("cuda"), epoch=1).availability.cpu(), drop(batch, epoch=1).availability)


def test_official_generate_m_rules_small():
    ids = np.array([[101, 500, 501, 502, 102, 0], [101, 600, 601, 602, 603, 102]], dtype=np.float64)
    mask = (ids > 0).astype(np.float64)
    out, length, _, keep = official_lnln_generate_m(ids, mask, None, np.array([[1.0], [1.0]]), 0, "text")
    np.testing.assert_array_equal(length, [5, 0])  # argmin of a full mask is 0 -> [SEP] = index -1
    np.testing.assert_array_equal(keep, [[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(out, [[101, 100, 100, 100, 102, 0], [101, 100, 100, 100, 100, 102]])
    np.random.seed(7)
    u = np.random.uniform(size=(2, 6))
    _, _, _, keep = official_lnln_generate_m(ids, mask, None, np.array([[0.5], [0.5]]), 7, "text")
    expected = ((u > 0.5) * mask)
    expected[:, 0] = 1
    expected[0, 4] = expected[1, 5] = 1
    np.testing.assert_array_equal(keep, expected)
    audio = np.ones((2, 4, 1))
    out, _, _, keep = official_lnln_generate_m(audio, None, np.array([2, 4]), np.array([[0.0], [0.0]]), 0, "audio")
    np.testing.assert_array_equal(keep, [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_official_train_rates_half_zero():
    np.random.seed(0)
    random.seed(0)
    r = official_lnln_train_rates(101)
    assert r.shape == (101, 3) and ((r == 0).sum(0) == 50).all()


@pytest.mark.skipif(not os.path.exists(LNLN_FIXTURE), reason="parity fixture not available")
def test_official_lnln_masks_match_fixture():
    fx = torch.load(LNLN_FIXTURE, weights_only=True, mmap=True)
    m = fx["inputs_mmsa"]
    case = fx["extra_cases"]["erased"]["inputs_official"]
    e = case["erasure"]
    rates = torch.cat([e["missing_rate_l"], e["missing_rate_a"], e["missing_rate_v"]], 1).numpy()
    out = official_lnln_masks(m["text_bert"].numpy(), m["audio"].numpy(), m["vision"].numpy(),
                              m["audio_lengths"].numpy(), m["vision_lengths"].numpy(), rates, e["missing_seed"])
    for key in ("text_keep_mask", "audio_keep_mask", "vision_keep_mask"):
        np.testing.assert_array_equal(out[key], e[key].numpy())
    np.testing.assert_array_equal(out["text_bert"], case["incomplete_input"]["text"].numpy())
    np.testing.assert_array_equal(out["audio"], case["incomplete_input"]["audio"].numpy())


# ---- (b) ModalityDrop --------------------------------------------------------------------------------
@pytest.mark.parametrize("mr", [0.0, 0.1, 0.3, 0.5, 2 / 3])
def test_modality_drop_rate(batch, mr):
    out = ModalityDrop(mr, seed=4)(batch)
    avail = out.availability
    assert avail.dtype == torch.bool and avail.shape == (batch.batch_size, 3)
    assert avail.any(1).all()
    assert abs((1 - avail.float().mean().item()) - mr) < 0.015
    assert torch.equal(out.audio, batch.audio * avail[:, 1, None, None])
    assert torch.equal(out.text_ids, batch.text_ids) and out.complete is batch
    assert torch.isfinite(masked_mean(out.vision, ~out.vision_padding_mask)).all()


def test_modality_drop_high_rate_and_independence(batch):
    out = ModalityDrop(0.7)(batch)
    assert (out.availability.sum(1) == 1).all()
    with pytest.raises(ValueError, match="mr"):
        ModalityDrop(1.0)
    proto = ModalityDrop(0.3, seed=2)
    full = proto(batch, epoch=1).availability
    perm = torch.randperm(batch.batch_size, generator=torch.Generator().manual_seed(1))
    parts = torch.cat([proto(subset(batch, p), epoch=1).availability for p in torch.split(perm, 64)])
    assert torch.equal(parts, full[perm])
    assert not torch.equal(proto(batch, epoch=2).availability, full)
    chained = ModalityDrop(0.3, seed=5)(proto(batch, epoch=1))
    assert torch.equal(chained.availability, full & ModalityDrop(0.3, seed=5).availability(batch.index))
    assert chained.complete is batch


def test_generate_missing_matrix_properties():
    rs = np.random.RandomState(0)
    for mr in (0.1, 0.3, 0.5):
        m = generate_missing_matrix(2000, 3, mr, rng=rs)
        assert m.shape == (2000, 3) and (m.sum(1) >= 1).all() and abs(m.mean() - (1 - mr)) < 0.005
    one = generate_missing_matrix(50, 3, 0.7, rng=rs)
    assert (one.sum(1) == 1).all()
    assert (generate_missing_matrix(5, 3, 0.0, rng=rs) == 1).all()
    small = generate_missing_matrix(8, 3, 0.2, rng=rs)
    assert small.shape == (8, 3) and (small.sum(1) >= 1).all()


@pytest.mark.skipif(not os.path.exists(HME_FIXTURE), reason="parity fixture not available")
def test_generate_missing_matrix_matches_fixture():
    fx = torch.load(HME_FIXTURE, weights_only=True, mmap=True)
    case = fx["extra_cases"]["missing_mr0.2"]["inputs_official"]
    assert "generate_missing_matrix(test_nums=686, 3, missing_rate=0.2)" in case["ps_source"]
    state = np.random.get_state()
    try:
        np.random.seed(fx["seed"])
        ps = generate_missing_matrix(686, 3, 0.2)
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(ps[:8], case["ps"].numpy())


# ---- (c) PatternAvailability -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PATTERNS))
def test_fixed_patterns(batch, name):
    out = PatternAvailability(pattern=name.lower())(batch)
    assert torch.equal(out.availability, torch.tensor(PATTERNS[name], dtype=torch.bool).expand(batch.batch_size, 3))
    assert torch.isfinite(masked_mean(out.audio, ~out.audio_padding_mask)).all()
    if not PATTERNS[name][1]:
        assert (out.audio == 0).all()


def test_miss_prob(batch):
    out = PatternAvailability(miss_prob=0.5, seed=3)(batch)
    incomplete = ~out.availability.all(1)
    assert abs(incomplete.float().mean().item() - 0.5) < 0.03
    table = torch.tensor(INCOMPLETE_PATTERNS, dtype=torch.bool)
    which = (out.availability[incomplete][:, None, :] == table[None]).all(-1)
    assert which.any(1).all()
    counts = which.float().mean(0)
    assert ((counts - 1 / 6).abs() < 0.03).all()
    assert PatternAvailability(miss_prob=0.0)(batch).availability.all()
    assert (~PatternAvailability(miss_prob=1.0)(batch).availability.all(1)).all()
    with pytest.raises(ValueError, match="exactly one"):
        PatternAvailability()
    with pytest.raises(ValueError, match="pattern"):
        PatternAvailability(pattern="XY")


def test_text_features_zeroed_when_text_missing():
    data = synthetic("mosi", 4, 1, 1, seed=0)
    b = MMSADataset(data["train"])[[0, 1, 2, 3]]
    out = PatternAvailability(pattern="AV")(b)
    assert (out.text_features == 0).all() and torch.equal(out.text_ids, b.text_ids)


# ---- parse_missing -------------------------------------------------------------------------------------
def test_parse_missing():
    assert parse_missing("none") is None and parse_missing(None) is None
    p = parse_missing("lnln:0.5", seed=3)
    assert isinstance(p, TokenErasure) and p.rate == 0.5 and p.seed == 3
    assert parse_missing("lnln:train").rate is None
    assert isinstance(parse_missing("modality:0.3"), ModalityDrop)
    assert parse_missing("pattern:TA").pattern == "TA"
    assert parse_missing("pattern_prob:0.5").miss_prob == 0.5
    assert "lnln:0.5" in p.describe()
    for bad, fragment in (("lnln", "expected"), ("lnln:abc", "not a number"), ("foo:1", "unknown kind"),
                          ("lnln:1.5", r"\[0, 1\]"), ("pattern:Q", "pattern"), ("modality:", "expected")):
        with pytest.raises(ValueError, match=fragment):
            parse_missing(bad)
