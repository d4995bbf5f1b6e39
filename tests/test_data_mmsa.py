"""MMSA pickle reader/validator and the MAG-BERT adapter."""
import copy
import pickle

import numpy as np
import pytest

from msa_fast.data import load_mmsa, read_mag, save_mmsa, synthetic, to_mag


@pytest.fixture(scope="module")
def small():
    return synthetic("mosi", 12, 5, 6, seed=3)


def _clone(data):
    return copy.deepcopy(data)


def test_roundtrip_path_and_dict(small, tmp_path):
    path = tmp_path / "d.pkl"
    save_mmsa(small, path)
    data, report = load_mmsa(path, return_report=True)
    assert list(data) == ["train", "valid", "test"]
    for split in data:
        assert set(data[split]) == set(small[split])
        for key, value in small[split].items():
            np.testing.assert_array_equal(np.asarray(data[split][key]), np.asarray(value))
        assert report[split]["audio_padding"] == "right" and report[split]["audio_nonfinite"] == 0
    only = load_mmsa(small, splits=("test",))
    assert list(only) == ["test"]


def test_nonfinite_zeroed_counted_and_input_untouched(small):
    data = _clone(small)
    audio = data["train"]["audio"]
    audio[0, 0, 0] = -np.inf
    audio[1, 2, 3] = np.nan
    data["valid"]["vision"][0, 0, :2] = -np.inf
    out, report = load_mmsa(data, return_report=True)
    assert report["train"]["audio_nonfinite"] == 2 and report["valid"]["vision_nonfinite"] == 2
    assert out["train"]["audio"][0, 0, 0] == 0 and out["train"]["audio"][1, 2, 3] == 0
    assert np.isneginf(audio[0, 0, 0])  # the caller's array is not modified


def test_aligned_lengths_filled():
    data = synthetic("mosi", 4, 2, 2, aligned=True)
    assert "audio_lengths" not in data["train"]
    out, report = load_mmsa(data, return_report=True)
    np.testing.assert_array_equal(out["train"]["audio_lengths"], np.full(4, 50))
    assert report["train"]["vision_padding"] == "full"


def test_labels_column_vector_and_float64_features(small):
    data = _clone(small)
    data["train"]["regression_labels"] = data["train"]["regression_labels"].reshape(-1, 1).astype(np.float64)
    data["train"]["audio"] = data["train"]["audio"].astype(np.float64)
    out = load_mmsa(data)
    assert out["train"]["regression_labels"].shape == (12,)
    assert out["train"]["audio"].dtype == np.float32


def _break(data, split, key, value):
    data[split][key] = value
    return data


MALFORMED = [
    ("valid", "audio", lambda d: d["valid"]["audio"][:3], "expected"),
    ("train", "text_bert", lambda d: d["train"]["text_bert"][:, 0], "(N, 3, L_t)"),
    ("train", "text_bert", lambda d: np.concatenate([d["train"]["text_bert"], d["train"]["text_bert"]], 1), "3"),
    ("test", "audio_lengths", lambda d: d["test"]["audio_lengths"] + 1000, "values in [0, 375]"),
    ("test", "vision_lengths", lambda d: d["test"]["vision_lengths"][:2], "(6,)"),
    ("train", "regression_labels", lambda d: np.full(12, np.nan, np.float32), "finite"),
    ("valid", "regression_labels", lambda d: np.zeros(4, np.float32), "(5,)"),
    ("train", "id", lambda d: d["train"]["id"][:3], "12 strings"),
    ("train", "raw_text", lambda d: np.arange(12), "strings"),
    ("train", "text", lambda d: d["train"]["text"][:, :10], "(12, 50, D_t)"),
    ("valid", "vision", lambda d: np.array(["a"] * 5), "dtype <U1"),
]


@pytest.mark.parametrize("split,key,make,fragment", MALFORMED)
def test_malformed_names_split_and_key(small, split, key, make, fragment):
    data = _clone(small)
    data[split][key] = make(data)
    with pytest.raises(ValueError) as err:
        load_mmsa(data)
    msg = str(err.value)
    assert f"split {split!r}" in msg and f"key {key!r}" in msg and fragment in msg and "\n" not in msg


def test_missing_key_and_split(small):
    data = _clone(small)
    del data["valid"]["text_bert"]
    with pytest.raises(ValueError, match="split 'valid': required key 'text_bert'"):
        load_mmsa(data)
    with pytest.raises(ValueError, match="split 'dev'"):
        load_mmsa(small, splits=("dev",))
    with pytest.raises(FileNotFoundError):
        load_mmsa("/nonexistent/file.pkl")


def test_bad_attention_mask(small):
    data = _clone(small)
    data["train"]["text_bert"][2, 1, 3] = 0  # a hole inside the real tokens
    with pytest.raises(ValueError, match="right-padded attention masks.*sample 2"):
        load_mmsa(data)


def test_nonzero_padding_fails_loudly(small):
    data = _clone(small)
    i, length = 4, int(data["test"]["vision_lengths"][4])
    assert length < 500
    data["test"]["vision"][i, length:, 0] = 1.0  # junk beyond the length on one sample, data at the start too
    with pytest.raises(ValueError, match=r"split 'test', key 'vision'.*sample 4"):
        load_mmsa(data)
    out, report = load_mmsa(data, padding="ignore", return_report=True)
    assert report["test"]["vision_padding"] == "unchecked"


def _left_pad(x, lengths):
    out = np.zeros_like(x)
    for i, n in enumerate(lengths):
        if n:
            out[i, -n:] = x[i, :n]
    return out


def test_left_padding_detected_and_shifted(small):
    data = _clone(small)
    for split in data:
        d = data[split]
        d["audio_lengths"] = d["audio_lengths"].copy()
        d["audio_lengths"][0] = 100  # make sure some samples are padded
        d["audio"][0, 100:] = 0
        d["audio"] = _left_pad(d["audio"], d["audio_lengths"])
    out, report = load_mmsa(data, return_report=True)
    assert report["train"]["audio_padding"] == "left" and report["train"]["vision_padding"] == "right"
    expected = _clone(small)["train"]["audio"].copy()
    expected[0, 100:] = 0
    np.testing.assert_array_equal(out["train"]["audio"], expected)
    with pytest.raises(ValueError, match="key 'audio'"):
        load_mmsa(data, padding="right")
    for split in data:  # all left padded: padding="left" accepts, "auto" detects both
        data[split]["vision"] = _left_pad(data[split]["vision"], data[split]["vision_lengths"])
    out2, report2 = load_mmsa(data, padding="left", return_report=True)
    np.testing.assert_array_equal(out2["train"]["audio"], expected)
    np.testing.assert_array_equal(out2["valid"]["vision"], small["valid"]["vision"])
    assert report2["test"]["vision_padding"] == "left"


def test_unreadable_pickle(tmp_path):
    path = tmp_path / "bad.pkl"
    path.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read the pickle"):
        load_mmsa(path)
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="dict of splits"):
        load_mmsa(path)


def test_unknown_keys_pass_through(small):
    data = _clone(small)
    data["train"]["annotations"] = ["x"] * 12
    assert load_mmsa(data)["train"]["annotations"] == ["x"] * 12


# ---- MAG-BERT adapter ------------------------------------------------------------------------------------
def test_mag_roundtrip():
    data = load_mmsa(synthetic("mosi", 6, 3, 3, seed=1, aligned=True))
    mag = to_mag(data)
    assert set(mag) == {"train", "dev", "test"}
    (words, visual, acoustic), label, segment = mag["train"][0]
    n = int(data["train"]["text_bert"][0, 1].sum())
    assert len(words) == n - 2 and visual.shape == (n - 2, 20) and acoustic.shape == (n - 2, 5)
    assert label.shape == (1, 1) and segment == data["train"]["id"][0]
    back = read_mag(mag)
    assert list(back) == ["train", "valid", "test"]
    for split in back:
        for key in ("text_bert", "audio", "vision", "regression_labels"):
            np.testing.assert_array_equal(back[split][key], data[split][key])
        assert list(back[split]["raw_text"]) == list(data[split]["raw_text"])


def test_mag_processing_rules(tmp_path):
    words = [f"w{200 + k}" for k in range(60)]  # longer than 48 tokens
    acoustic = np.ones((60, 5), np.float32)
    acoustic[0, 0] = -np.inf
    rows = [((words, np.ones((60, 20)), acoustic), np.array([[1.5]]), "vid$_$1")]
    raw = {"train": rows, "dev": rows, "test": rows}
    path = tmp_path / "mag.pkl"
    path.write_bytes(pickle.dumps(raw))
    out = read_mag(path)["train"]
    tb = out["text_bert"][0]
    assert tb[0, 0] == 101 and tb[0, 49] == 102 and tb[1].sum() == 50  # [CLS] + 48 + [SEP]
    np.testing.assert_array_equal(tb[0, 1:49], np.arange(200, 248))
    assert (out["audio"][0, 0] == 0).all() and (out["audio"][0, 49] == 0).all()  # zero rows at [CLS] / [SEP]
    assert out["audio"][0, 1, 0] == 0 and (out["audio"][0, 2:49] == 1).all()  # -inf -> 0, rows truncated to 48
    assert out["regression_labels"][0] == 1.5 and out["id"][0] == "vid$_$1"


def test_mag_errors():
    rows = [((["hello"], np.ones((1, 20)), np.ones((1, 5))), 0.0, "a")]
    with pytest.raises(ValueError, match="tokenize"):
        read_mag({"train": rows, "dev": rows, "test": rows})
    ok = read_mag({"train": rows, "dev": rows, "test": rows}, tokenize=lambda w: [500, 501])
    assert ok["train"]["text_bert"][0, 1].sum() == 4
    with pytest.raises(ValueError, match="split 'dev'"):
        read_mag({"train": rows}, tokenize=lambda w: [500])
    with pytest.raises(ValueError, match="aligned layout"):
        to_mag(synthetic("mosi", 2, 2, 2))


def test_pickles_load_as_data_only(small, tmp_path):
    import os

    from msa_fast.data import UnsafePickleError

    class Evil:
        def __reduce__(self):
            return os.getcwd, ()

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(dict(small, extra=Evil()), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"'(posix|nt)\.getcwd'.*trusted=True.*--trust-pickle"):
        load_mmsa(path)  # refused as such, not reported as an unreadable file
    assert list(load_mmsa(path, trusted=True)) == ["train", "valid", "test"]
