"""msa-fast bench official: argument errors, the adapters' input conversion against the parity fixtures, the check
and the interleaving; a smoke run per method when an official checkout is given (MSA_FAST_OFFICIAL_ROOT = a folder
holding the checkouts DashFusion/, LNLN/, HME/ — the official code is never part of the repository)."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from msa_fast.bench.official import check_same_prediction, get_adapter, interleaved_times
from msa_fast.bench.official.common import OfficialRootError, RowTokenizer, row_texts
from msa_fast.bench.official.dashfusion import dashfusion_inputs
from msa_fast.bench.official.hme import HME_MOSI_ARGS, hme_inputs
from msa_fast.bench.official.lnln import lnln_inputs
from msa_fast.cli import main
from msa_fast.data.batch import Batch

from parity_fixtures import load_parity

UNK = 100
#: method → (folder under MSA_FAST_OFFICIAL_ROOT, marker file relative to that folder)
CHECKOUTS = {"dashfusion": ("DashFusion", "src/model/dashfusion.py"), "lnln": ("LNLN", "models/lnln.py"),
             "hme": ("HME", "HME_MSA/HME_model.py")}


# ---------------------------------------------------------------------------------------------------------------
# argument errors
# ---------------------------------------------------------------------------------------------------------------
def _run(argv, capsys) -> tuple[int, str]:
    rc = main(["bench", "official", *argv])
    return rc, capsys.readouterr().err


def test_missing_official_root_names_the_option(capsys):
    rc, err = _run(["--method", "hme"], capsys)
    assert rc == 2
    assert "--official-root is required" in err and "YetZzzzzz/HME" in err


@pytest.mark.parametrize("method", sorted(CHECKOUTS))
def test_nonexistent_official_root(method, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    rc, err = _run(["--method", method, "--official-root", str(missing)], capsys)
    assert rc == 2
    assert "--official-root" in err and str(missing) in err and "does not exist" in err


def test_official_root_not_a_checkout(tmp_path, capsys):
    rc, err = _run(["--method", "lnln", "--official-root", str(tmp_path)], capsys)
    assert rc == 2
    assert "--official-root" in err and "not a checkout of Haoyu-ha/LNLN" in err and "models/lnln.py" in err
    f = tmp_path / "file.txt"
    f.write_text("x")
    rc, err = _run(["--method", "lnln", "--official-root", str(f)], capsys)
    assert rc == 2 and "--official-root" in err and "not a directory" in err


def test_invalid_method_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "official", "--method", "midg", "--official-root", str(tmp_path)])
    assert exc.value.code == 2
    assert "--method" in capsys.readouterr().err


@pytest.mark.parametrize("method", sorted(CHECKOUTS))
def test_root_resolves_repository_or_code_dir(method, tmp_path):
    folder, marker = CHECKOUTS[method]
    repo = tmp_path / folder
    (repo / marker).parent.mkdir(parents=True)
    (repo / marker).write_text("# stand-in\n")
    code_dir = (repo / marker).parent.parent if method == "lnln" else (repo / marker).parent
    if method == "dashfusion":
        code_dir = repo / "src"
    assert get_adapter(method, repo).code_dir == code_dir.resolve()
    assert get_adapter(method, code_dir).code_dir == code_dir.resolve()  # the code folder itself is accepted
    with pytest.raises(OfficialRootError):
        get_adapter(method, "")


def test_bad_sizes_are_errors(tmp_path, capsys):
    repo = tmp_path / "LNLN"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "lnln.py").write_text("")
    rc, err = _run(["--method", "lnln", "--official-root", str(repo), "--repeats", "0"], capsys)
    assert rc == 2 and "--repeats must be >= 1" in err


# ---------------------------------------------------------------------------------------------------------------
# input conversion: inputs_mmsa → our Batch → the converter must give inputs_official exactly
# ---------------------------------------------------------------------------------------------------------------
def _batch(x: dict, **changes) -> Batch:
    tb = x["text_bert"].long()
    n = x["regression_labels"].shape[0]
    b = Batch(text_ids=tb[:, 0], text_attention_mask=tb[:, 1], text_segment_ids=tb[:, 2], audio=x["audio"],
              vision=x["vision"], audio_lengths=x["audio_lengths"], vision_lengths=x["vision_lengths"],
              labels=x["regression_labels"], index=torch.arange(n), ids=list(x["id"]), raw_text=list(x["raw_text"]))
    return b.replace(**changes) if changes else b


def _assert_same(got, expected, where: str) -> None:
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert got.dtype == expected.dtype and got.shape == expected.shape, (where, got.dtype, expected.dtype)
        assert torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert set(got) >= set(expected), (where, set(expected) - set(got))
        for k in expected:
            _assert_same(got[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, e) in enumerate(zip(got, expected)):
            _assert_same(a, e, f"{where}[{i}]")
    else:
        assert got == expected, where


def _tokenize(tok: RowTokenizer, texts):
    return tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt").to("cpu")


def test_dashfusion_conversion_matches_fixture():
    fx = load_parity("dashfusion_mosi.pt")
    batch = _batch(fx["inputs_mmsa"])
    x = dashfusion_inputs(batch)
    _assert_same(x["sample1"], fx["inputs_official"]["sample1"], "sample1")
    assert x["sample2"] is None
    enc = _tokenize(x["tokenizer"], x["sample1"]["raw_text"])
    _assert_same(dict(enc), fx["inputs_official"]["tokenized"], "tokenized")
    assert set(enc) == {"input_ids", "token_type_ids", "attention_mask"}  # bert variant: no features


def test_dashfusion_partners_and_features():
    fx = load_parity("dashfusion_mosi.pt")
    batch = _batch(fx["inputs_mmsa"])
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(batch.batch_size, batch.text_ids.shape[1], 768, generator=g)
    batch = batch.replace(text_features=feats)
    rows = torch.tensor([(i + k) % batch.batch_size for i in range(batch.batch_size) for k in (1, 2, 3, 4, 5, 6)])
    x = dashfusion_inputs(batch, features=True, partner_rows=rows)
    s2 = x["sample2"]
    assert torch.equal(s2["audio"], batch.audio[rows]) and torch.equal(s2["vision"], batch.vision[rows])
    assert torch.equal(s2["regression_labels"], batch.labels[rows])
    enc = _tokenize(x["tokenizer"], s2["raw_text"])
    n = int(batch.text_attention_mask[rows].sum(1).max())
    assert torch.equal(enc["input_ids"], batch.text_ids[rows, :n])
    assert torch.equal(enc["attention_mask"], batch.text_attention_mask[rows, :n])
    valid = batch.text_attention_mask[rows, :n, None].float()
    assert torch.equal(enc["inputs_embeds"], feats[rows, :n] * valid)


def test_row_texts_keep_rows_with_equal_raw_text_apart():
    ids = torch.tensor([[101, 200, 102, 0], [101, 300, 102, 0], [101, 200, 102, 0]])
    mask = (ids > 0).long()
    b = Batch(text_ids=ids, text_attention_mask=mask, text_segment_ids=torch.zeros_like(ids),
              audio=torch.zeros(3, 2, 1), vision=torch.zeros(3, 2, 1), audio_lengths=torch.ones(3, dtype=torch.long),
              vision_lengths=torch.ones(3, dtype=torch.long), labels=torch.zeros(3), index=torch.arange(3),
              raw_text=["same", "same", "same"])
    texts, table = row_texts(b)
    assert texts[0] == texts[2] == "same" and texts[1] != "same"
    enc = RowTokenizer(table)(texts)
    assert torch.equal(enc["input_ids"], ids[:, :3])
    with pytest.raises(ValueError, match="prefix"):
        row_texts(b.replace(text_attention_mask=torch.tensor([[1, 0, 1, 0]] * 3)))


def _erase(complete: Batch, er: dict) -> Batch:
    valid = complete.text_attention_mask.bool()
    ids = torch.where(valid & ~er["text_keep_mask"], torch.full_like(complete.text_ids, UNK), complete.text_ids)
    rates = torch.cat([er["missing_rate_l"], er["missing_rate_a"], er["missing_rate_v"]], dim=1)
    return complete.replace(text_ids=ids, audio=complete.audio * er["audio_keep_mask"][..., None],
                            vision=complete.vision * er["vision_keep_mask"][..., None], missing_rates=rates,
                            text_keep_mask=er["text_keep_mask"], audio_keep_mask=er["audio_keep_mask"],
                            vision_keep_mask=er["vision_keep_mask"], complete=complete)


@pytest.mark.parametrize("case_name", ["complete", "erased"])
def test_lnln_conversion_matches_fixture(case_name):
    fx = load_parity("lnln_mosi.pt")
    case = fx if fx["case"] == case_name else fx["extra_cases"][case_name]
    batch = _batch(fx["inputs_mmsa"])
    er = case["inputs_official"]["erasure"]
    if er is not None:
        batch = _erase(batch, er)
    x = lnln_inputs(batch)
    for key in ("complete_input", "incomplete_input"):
        off = case["inputs_official"][key]
        _assert_same(x[key], (off["vision"], off["audio"], off["text"]), key)
    _assert_same(x["labels"], case["inputs_official"]["labels"], "labels")


def test_lnln_features_ride_in_the_text_slot():
    fx = load_parity("lnln_mosi.pt")
    feats = torch.randn(8, 50, 768)
    batch = _batch(fx["inputs_mmsa"], text_features=feats)
    x = lnln_inputs(batch, features=True)
    assert x["incomplete_input"][2] is feats and x["complete_input"][2] is feats


@pytest.mark.parametrize("case_name", ["full", "missing", "missing_mr0.2"])
def test_hme_conversion_matches_fixture(case_name):
    fx = load_parity("hme_mosi.pt")
    case = fx if fx["case"] == case_name else fx["extra_cases"][case_name]
    x_mmsa = fx["inputs_mmsa"]
    n = x_mmsa["regression_labels"].shape[0]
    batch = _batch(x_mmsa, audio=x_mmsa["audio_aligned"], vision=x_mmsa["vision_aligned"],
                   audio_lengths=torch.full((n,), 50), vision_lengths=torch.full((n,), 50),
                   availability=case["inputs_official"]["ps"].bool())
    expected = {k: v for k, v in case["inputs_official"].items() if k != "ps_source"}
    got = hme_inputs(batch)
    assert set(got) == set(expected)
    _assert_same(got, expected, "inputs")


def test_hme_args_are_the_readme_mosi_command():
    """The fixture ran the README MOSI command with reduced depths appended; everything else must agree."""
    fx_args = dict(load_parity("hme_mosi.pt")["config"]["args"])
    fx_args.update(layers=4, hyper_depth=3, latent_layers=4, d_l=192)  # the README values the fixture overrode
    assert HME_MOSI_ARGS == fx_args


# ---------------------------------------------------------------------------------------------------------------
# the check and the interleaving
# ---------------------------------------------------------------------------------------------------------------
class _FakeAdapter:
    method = "fake"

    def __init__(self, pred):
        self.pred = pred

    def inputs(self, batch, features, extra=None):
        return {}

    def predict(self, model, inputs):
        return self.pred


class _FakeOurs(torch.nn.Module):
    def __init__(self, pred):
        super().__init__()
        self.pred = pred
        self.loaded = None

    def load_official_state_dict(self, sd):
        self.loaded = sd

    def forward(self, batch):
        return {"M": self.pred}


def test_check_passes_on_equal_and_fails_loudly_otherwise():
    official = torch.nn.Linear(1, 1)
    ours = _FakeOurs(torch.tensor([1.0, -2.0]))
    err = check_same_prediction(_FakeAdapter(torch.tensor([1.0, -2.0 + 1e-6])), official, ours, None, False, 1e-5)
    assert err == pytest.approx(1e-6, abs=1e-7) and set(ours.loaded) == {"weight", "bias"}
    with pytest.raises(RuntimeError, match="disagree"):
        check_same_prediction(_FakeAdapter(torch.tensor([1.0, -1.0])), official, ours, None, False, 1e-5)
    with pytest.raises(RuntimeError, match="disagree"):
        check_same_prediction(_FakeAdapter(torch.tensor([1.0, float("nan")])), official, _FakeOurs(
            torch.tensor([1.0, float("nan")])), None, False, 1e-5)


def test_interleaving_alternates_and_reports_median_ratio():
    calls = []
    out = interleaved_times(lambda: calls.append("official"), lambda: calls.append("ours"), repeats=4, warmup=1)
    assert calls == ["official", "ours", "official", "ours", "ours", "official", "official", "ours", "ours",
                     "official"]
    assert [r["first"] for r in out["rounds"]] == ["official", "ours", "official", "ours"]
    assert out["ratio"] == statistics.median(r["official_ms"] / r["ours_ms"] for r in out["rounds"])
    assert out["official_ms"] == statistics.median(r["official_ms"] for r in out["rounds"])


# ---------------------------------------------------------------------------------------------------------------
# smoke run against a real checkout (skipped without MSA_FAST_OFFICIAL_ROOT)
# ---------------------------------------------------------------------------------------------------------------
def _official_checkout(method: str) -> Path:
    root = os.environ.get("MSA_FAST_OFFICIAL_ROOT")
    if not root:
        pytest.skip("set MSA_FAST_OFFICIAL_ROOT to a folder holding the official checkouts DashFusion/, LNLN/, HME/")
    folder, marker = CHECKOUTS[method]
    path = Path(root) / folder
    if not (path / marker).is_file():
        pytest.skip(f"no {method} checkout at {path}")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CHECKOUTS))
def test_smoke_against_official_checkout(method, tmp_path, capsys):
    path = _official_checkout(method)
    out = tmp_path / "rows.json"
    rc = main(["bench", "official", "--method", method, "--official-root", str(path), "--smoke", "--threads", "1",
               "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["tiny-bert", "features"]
    for r in rows:
        assert r["official_ms"] > 0 and r["ours_ms"] > 0 and r["official/ours"] > 0
        assert r["check_max_err"] <= 1e-5


def test_our_config_overrides_parse():
    from msa_fast.bench.official import parse_our_config

    assert parse_our_config(["prune_rows=false", "d_model=64", "bert_name=abc", "x= 1.5"]) == \
        {"prune_rows": False, "d_model": 64, "bert_name": "abc", "x": 1.5}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_our_config(["novalue"])
