"""Pre-flight checks (msa_fast.data.preflight): the right data for the run, before training spends compute."""
import copy

import numpy as np
import pytest

from msa_fast.data import PreflightError, load_mmsa, preflight, preflight_problems, synthetic
from msa_fast.data.specs import get_dataset_spec


@pytest.fixture(scope="module")
def mosi():
    return load_mmsa(synthetic("mosi", 8, 4, 4, seed=0))


@pytest.fixture(scope="module")
def mosei():
    return load_mmsa(synthetic("mosei", 4, 3, 3, seed=0, text_features=False))


def _one_line_each(*lists):
    for messages in lists:
        for m in messages:
            assert "\n" not in m and ("split '" in m or "splits '" in m), m


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "sims"])
def test_clean_data_passes(dataset):
    data = synthetic(dataset, 6, 3, 3, seed=1, text_features=False)
    for d in (data, load_mmsa(data)):
        errors, warnings = preflight_problems(d, dataset, vocab_size=30522)
        assert errors == [] and warnings == []
    assert preflight(data, get_dataset_spec(dataset)) == []


def test_missing_and_empty_splits(mosi):
    data = dict(mosi)
    del data["test"]
    data["valid"] = synthetic("mosi", 3, 0, 3)["valid"]
    errors, _ = preflight_problems(data, "mosi")
    assert len(errors) == 2
    assert errors[0].startswith("split 'valid': empty (0 samples)")
    assert errors[1].startswith("split 'test': missing (found splits ['train', 'valid'])")
    assert preflight_problems(data, "mosi", splits=("train",)).ok  # a run that uses only train


def test_feature_dims_against_the_dataset(mosei):
    errors, _ = preflight_problems(mosei, "mosi")
    assert errors == [
        "splits 'train', 'valid', 'test', key 'audio': feature dim 74 does not match mosi (5); the dims fit mosei: "
        "pass -d mosei, or build the model with audio dim 74 if these are other features",
        "splits 'train', 'valid', 'test', key 'vision': feature dim 35 does not match mosi (20); the dims fit mosei: "
        "pass -d mosei, or build the model with vision dim 35 if these are other features",
    ]
    # a model built for these features: the model's dims are what count
    assert preflight_problems(mosei, "mosi", dims={"audio": 74, "vision": 35}).ok
    errors, _ = preflight_problems(mosei, "mosei", dims={"audio": 5})
    assert errors == ["splits 'train', 'valid', 'test', key 'audio': feature dim 74 does not match the model's audio "
                      "dim (5); build the model with audio dim 74 or use 5-dim audio features"]
    with pytest.raises(ValueError, match="dims keys"):
        preflight_problems(mosei, "mosei", dims={"acoustic": 74})


def test_one_split_with_other_dims(mosi):
    data = copy.deepcopy(mosi)
    data["test"]["vision"] = np.zeros((4, 500, 7), np.float32)
    errors, _ = preflight_problems(data, "mosi")
    assert len(errors) == 1 and errors[0].startswith("split 'test', key 'vision': feature dim 7 does not match mosi "
                                                     "(20); pass the right -d, or build the model")
    data["test"]["text"] = np.zeros((4, 50, 512), np.float32)
    data["test"]["vision"] = np.zeros((4, 500), np.float32)
    errors, _ = preflight_problems(data, "mosi")
    assert len(errors) == 1  # the model does not read the precomputed text features: their dim does not matter
    assert "key 'vision': expected (N, L, D) numeric features, found shape (4, 500)" in errors[0]
    errors, _ = preflight_problems(data, "mosi", required_keys=("text", "audio", "vision", "regression_labels"))
    assert any("key 'text': feature dim 512 does not match mosi (768)" in e for e in errors)
    errors, _ = preflight_problems(data, "mosi", dims={"text": 512, "vision": None}, splits=("test",))
    assert len(errors) == 1 and "key 'vision'" in errors[0]  # a text dim given: text is checked, and fits


def test_labels_out_of_range_refused_unless_allowed(mosi):
    errors, warnings = preflight_problems(mosi, "sims")  # MOSI labels in [-3, 3] run as SIMS [-1, 1]
    label_errors = [e for e in errors if "regression_labels" in e]
    assert len(label_errors) == 3 and not warnings
    e = label_errors[0]
    assert e.startswith("split 'train', key 'regression_labels': ") and "outside sims's range [-1, 1]" in e
    assert "the labels fit mosi / mosei (pass -d mosi?)" in e and "--allow-label-range" in e
    errors2, warnings2 = preflight_problems(mosi, "sims", allow_label_range=True)
    assert not [e for e in errors2 if "regression_labels" in e]
    assert len(warnings2) == 3 and all("training anyway" in w for w in warnings2)
    _one_line_each(errors, warnings2)


def test_label_edges_and_sims_unimodal_labels():
    data = synthetic("sims", 5, 3, 3, seed=0, text_features=False)
    data["train"]["regression_labels"][:2] = [np.float32(1.0) + np.float32(1e-7), -1.0]
    assert preflight_problems(data, "sims").ok  # float noise at the boundary is in range
    data["valid"]["regression_labels_A"] = data["valid"]["regression_labels_A"].copy()
    data["valid"]["regression_labels_A"][0] = 1.4
    errors, _ = preflight_problems(data, "sims")
    assert errors == ["split 'valid', key 'regression_labels_A': 1 of 3 labels outside sims's range [-1, 1] (found "
                      f"[{data['valid']['regression_labels_A'].min():g}, 1.4]); the labels fit mosi / mosei (pass -d "
                      "mosi?); pass allow_label_range=True / --allow-label-range to train anyway"]


def test_nonfinite_features_and_labels(mosi):
    data = copy.deepcopy(mosi)
    data["train"]["audio"][0, 0, :3] = np.nan
    data["train"]["audio"][1, 0, 0] = -np.inf
    n = int(data["valid"]["vision_lengths"].sum()) * 20
    data["valid"]["vision"][:] = np.nan  # the whole modality
    data["test"]["regression_labels"][1] = np.inf
    errors, _ = preflight_problems(data, "mosi")
    total = int(data["train"]["audio_lengths"].sum()) * 5
    assert errors == [
        f"split 'train', key 'audio': 4 of {total} values are NaN/inf; expected finite features (load_mmsa zeroes "
        "NaN/inf in audio/vision as MMSA does)",
        f"split 'valid', key 'vision': all {n} values are NaN/inf (the modality carries no information); expected "
        "finite features",
        "split 'test', key 'regression_labels': 1 of 4 labels are NaN/inf; expected finite labels",
    ]


def test_nonfinite_zeroed_on_load_via_report():
    raw = synthetic("mosi", 6, 3, 3, seed=2, neg_inf_rate=0.05, text_features=False)
    for split in ("valid",):  # every valid audio value -inf in the file
        audio = raw[split]["audio"]
        valid = np.arange(audio.shape[1])[None, :] < raw[split]["audio_lengths"][:, None]
        audio[valid] = -np.inf
    data, report = load_mmsa(raw, return_report=True)
    errors, warnings = preflight_problems(data, "mosi", load_report=report)
    assert len(errors) == 1 and errors[0].startswith("split 'valid', key 'audio': all ")
    assert "values were NaN/inf in the file (zeroed on load)" in errors[0]
    zeroed = report["train"]["audio_nonfinite"]
    assert zeroed > 0 and f"split 'train', key 'audio': {zeroed} of " in warnings[0]
    assert "zeroed on load" in warnings[0]
    # without the report the blank modality is still noticed
    errors, warnings = preflight_problems(data, "mosi")
    assert errors == [] and warnings == ["split 'valid', key 'audio': every value is 0 (a missing or blanked "
                                         "modality?); expected features"]


def test_token_ids_within_vocabulary(mosi):
    assert preflight_problems(mosi, "mosi", vocab_size=30522).ok
    assert preflight_problems(mosi, "mosi", vocab_size=None).ok
    errors, _ = preflight_problems(mosi, "mosi", vocab_size=500)
    assert len(errors) == 3
    ids = mosi["train"]["text_bert"][:, 0]
    n_bad = int((ids >= 500).sum())
    assert errors[0] == (f"split 'train', key 'text_bert': {n_bad} token ids outside the BERT vocabulary [0, 500) "
                         f"(found ids in [0, {ids.max():g}]); the text was tokenised for another BERT "
                         "(bert-base-uncased has 30522 ids, bert-base-chinese 21128): use the matching pretrained "
                         "model")
    data = copy.deepcopy(mosi)
    data["test"]["text_bert"][0, 0, 1] = 30522
    errors, _ = preflight_problems(data, "mosi", vocab_size=30522)
    assert len(errors) == 1 and errors[0].startswith("split 'test', key 'text_bert': 1 token ids outside")


def test_required_keys(mosi):
    data = copy.deepcopy(mosi)
    del data["valid"]["text_bert"]
    errors, _ = preflight_problems(data, "mosi")
    assert len(errors) == 1 and errors[0].startswith("split 'valid', key 'text_bert': missing; the model reads it")
    no_text = load_mmsa(synthetic("mosi", 3, 2, 2, text_features=False))
    errors, _ = preflight_problems(no_text, "mosi", required_keys=("text", "audio", "vision", "regression_labels"))
    assert len(errors) == 3 and all("key 'text': missing" in e for e in errors)


def test_preflight_raises_all_errors_and_returns_warnings(mosei):
    with pytest.raises(PreflightError) as err:
        preflight(mosei, "sims", vocab_size=100)
    exc = err.value
    assert isinstance(exc, ValueError) and len(exc.errors) >= 4
    lines = str(exc).splitlines()
    assert lines[0].startswith(f"pre-flight check found {len(exc.errors)} problems")
    assert [line[4:] for line in lines[1:]] == exc.errors
    _one_line_each(exc.errors)
    data = load_mmsa(synthetic("mosi", 4, 2, 2, text_features=False))
    data["train"]["vision"] = np.zeros_like(data["train"]["vision"])
    warnings = preflight(data, "mosi")
    assert warnings == ["split 'train', key 'vision': every value is 0 (a missing or blanked modality?); expected "
                        "features"]
