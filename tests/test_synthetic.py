"""Synthetic MMSA-layout datasets: exact structure, ragged zero padding, vocabulary, planted cross-modal signal."""
import numpy as np
import pytest

from msa_fast.data import get_dataset_spec, load_mmsa, save_mmsa, synthetic
from msa_fast.data.synthetic import CLS_ID, NEGATIVE_IDS, POSITIVE_IDS, SEP_ID
from msa_fast.demo import baseline_scores


@pytest.mark.parametrize("name", ["mosi", "mosei", "sims"])
def test_structure_matches_spec(name):
    spec = get_dataset_spec(name)
    data = synthetic(name, 7, 3, 4, seed=0)
    assert list(data) == ["train", "valid", "test"]
    for split, n in zip(data, (7, 3, 4)):
        d = data[split]
        assert d["text_bert"].shape == (n, 3, spec.text_len) and d["text_bert"].dtype == np.float32
        assert d["text"].shape == (n, spec.text_len, 768) and d["text"].dtype == np.float32
        assert d["audio"].shape == (n, spec.audio_len, spec.audio_dim) and d["audio"].dtype == np.float32
        assert d["vision"].shape == (n, spec.vision_len, spec.vision_dim) and d["vision"].dtype == np.float32
        assert d["audio_lengths"].dtype == np.int64 and d["vision_lengths"].shape == (n,)
        assert d["regression_labels"].shape == (n,) and d["regression_labels"].dtype == np.float32
        assert len(d["raw_text"]) == n and len(d["id"]) == n and all("$_$" in i for i in d["id"])
        unimodal = {f"regression_labels_{m}" for m in "TAV"}
        assert unimodal <= set(d) if spec.unimodal_labels else not (unimodal & set(d))
        lo, hi = spec.label_range
        for key in [k for k in d if k.startswith("regression_labels")]:
            assert d[key].min() >= lo and d[key].max() <= hi
    load_mmsa(data)  # passes validation (incl. the zero-padding check)


def test_default_sizes_and_aligned():
    data = synthetic("mosi", n_train=5, n_valid=2, n_test=0)
    assert len(data["test"]["regression_labels"]) == 0
    aligned = synthetic("mosi", 5, 2, 2, aligned=True)
    assert aligned["train"]["audio"].shape == (5, 50, 5) and "vision_lengths" not in aligned["train"]
    tb = aligned["train"]["text_bert"]
    n = tb[:, 1].sum(1).astype(int)
    for i in range(5):  # zero rows at [CLS], [SEP] and padding
        assert (aligned["train"]["audio"][i, 0] == 0).all() and (aligned["train"]["audio"][i, n[i] - 1:] == 0).all()
    with pytest.raises(ValueError, match="aligned"):
        synthetic("sims", 2, 2, 2, aligned=True)
    with pytest.raises(ValueError, match="n_train"):
        synthetic("mosi", -1)
    with pytest.raises(ValueError, match="dataset"):
        synthetic("iemocap")


def test_ragged_lengths_and_zero_padding():
    d = synthetic("mosi", 300, 1, 1, seed=2)["train"]
    for m, max_len in (("audio", 375), ("vision", 500)):
        lens = d[f"{m}_lengths"]
        assert lens.min() >= 1 and lens.max() == max_len and len(np.unique(lens)) > 50
        pos = np.arange(max_len)[None, :]
        assert (d[m][pos >= lens[:, None]] == 0).all()
        assert (np.abs(d[m][pos < lens[:, None]]).sum(-1) > 0).all()
    n_tok = d["text_bert"][:, 1].sum(1)
    assert n_tok.min() >= 5 and n_tok.max() <= 50 and len(np.unique(n_tok)) > 10
    assert (d["text"][np.arange(50)[None, :] >= n_tok[:, None]] == 0).all()
    assert (d["regression_labels"] == 0).any()  # quantised labels include exact zeros (Non0 metrics matter)


def test_vocabulary_and_raw_text():
    d = synthetic("mosi", 50, 1, 1, seed=4)["train"]
    tb = d["text_bert"]
    for i in range(50):
        n = int(tb[i, 1].sum())
        ids = tb[i, 0].astype(int)
        assert ids[0] == CLS_ID and ids[n - 1] == SEP_ID and (ids[n:] == 0).all()
        assert ((ids[1:n - 1] >= 103) & (ids[1:n - 1] <= 999)).all()
        assert d["raw_text"][i] == " ".join(f"w{k}" for k in ids[1:n - 1])
        assert (tb[i, 2] == 0).all() and (tb[i, 1, :n] == 1).all()


def test_seeded():
    a, b, c = synthetic("sims", 5, 2, 2, seed=1), synthetic("sims", 5, 2, 2, seed=1), synthetic("sims", 5, 2, 2, seed=2)
    np.testing.assert_array_equal(a["valid"]["vision"], b["valid"]["vision"])
    assert not np.array_equal(a["valid"]["vision"], c["valid"]["vision"])
    assert not np.array_equal(a["train"]["regression_labels"][:2], a["valid"]["regression_labels"])


def test_neg_inf_and_save(tmp_path):
    data = synthetic("mosi", 4, 2, 2, neg_inf_rate=0.01, seed=5)
    assert np.isneginf(data["train"]["audio"]).any()
    save_mmsa(data, tmp_path / "x.pkl")
    out, report = load_mmsa(tmp_path / "x.pkl", return_report=True)
    assert report["train"]["audio_nonfinite"] == int(np.isneginf(data["train"]["audio"]).sum())
    assert np.isfinite(out["train"]["audio"]).all()


def test_text_features_memory_switch():
    assert "text" not in synthetic("mosi", 3, 1, 1, text_features=False)["train"]


@pytest.mark.parametrize("name", ["mosi", "sims"])
def test_planted_signal_fusion_beats_each_modality(name):
    results = baseline_scores(synthetic(name, 400, 100, 300, seed=7), name)
    fused = results["fused (t+a+v)"]
    singles = [results[m] for m in ("text", "audio", "vision")]
    assert all(0.2 < s["Corr"] < 0.8 for s in singles), results
    assert fused["Corr"] > 0.85 and all(fused["Corr"] > s["Corr"] + 0.15 for s in singles), results
    assert all(fused["MAE"] < s["MAE"] for s in singles) and fused["MAE"] < results["constant"]["MAE"]


def test_signal_in_token_ids():
    d = synthetic("mosi", 800, 1, 1, seed=8, text_features=False)["train"]
    ids = d["text_bert"][:, 0].astype(int)
    pos = ((ids >= POSITIVE_IDS[0]) & (ids < POSITIVE_IDS[1])).sum(1)
    neg = ((ids >= NEGATIVE_IDS[0]) & (ids < NEGATIVE_IDS[1])).sum(1)
    score = (pos - neg) / d["text_bert"][:, 1].sum(1)
    assert np.corrcoef(score, d["regression_labels"])[0, 1] > 0.3
