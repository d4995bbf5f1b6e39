"""``msa-fast train`` / ``msa-fast eval`` through ``msa_fast.cli.main`` on a tiny registered dummy model."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from msa_fast.cli import main
from msa_fast.models.base import MSAModel
from msa_fast.models.registry import register

SMALL = ["--data", "synthetic", "--n-train", "32", "--n-valid", "16", "--n-test", "16", "--quiet"]


@register("dummy_cli")
class DummyCLI(MSAModel):
    """Linear model on mean audio / vision features."""

    CONFIGS = {"common": {"hidden": 4, "lr": 1e-2, "batch_size": 8}, "mosi": {}}

    def __init__(self, config):
        super().__init__(config)
        c = self.config
        self.net = nn.Sequential(nn.Linear(c["audio_dim"] + c["vision_dim"], c["hidden"]), nn.Tanh(),
                                 nn.Linear(c["hidden"], 1))

    def forward(self, batch):
        x = torch.cat([batch.audio.mean(1), batch.vision.mean(1)], dim=-1)
        return {"M": self.net(x).squeeze(-1)}

    def loss(self, batch, outputs):
        return {"loss": nn.functional.l1_loss(outputs["M"], batch.labels)}


def _json_line(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["train", "-m", "dummy_cli", "-d", "mosi", *SMALL, "--seeds", "1111", "1112", "--epochs", "2",
               "--out", str(out), "--set", "hidden=3", "--key-eval", "MAE"])
    assert rc == 0
    with open(out / "results" / "normal" / "mosi.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "Model" and rows[1][0] == "dummy_cli" and rows[0][-2:] == ["MAE", "Corr"]
    detail = json.load(open(out / "results" / "normal" / "dummy_cli-mosi.json"))
    assert detail["seeds"] == [1111, 1112]
    assert capsys.readouterr().out == ""  # --quiet

    ckpt = out / "checkpoints" / "dummy_cli-mosi-seed1112" / "best.pt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["config"]["hidden"] == 3
    rc = main(["eval", "-m", "dummy_cli", "-d", "mosi", *SMALL[:-1], "--checkpoint", str(ckpt)])
    assert rc == 0
    got = _json_line(capsys.readouterr().out)["metrics"]
    expected = detail["per_seed"][1]
    assert {k: got[k] for k in expected} == pytest.approx(expected)  # eval reproduces the trainer's test numbers


def test_train_missing_and_resume(tmp_path, capsys):
    out = tmp_path / "runs"
    args = ["train", "-m", "dummy_cli", *SMALL, "--seeds", "5", "--epochs", "2", "--out", str(out),
            "--missing", "modality:0.3"]
    assert main(args) == 0
    csv_path = out / "results" / "missing-modality_0.3" / "mosi.csv"
    first = list(csv.reader(open(csv_path)))[1]
    # resuming a finished run only re-tests the selected checkpoint: same numbers, and its row is replaced (one row
    # per model), not appended a second time
    assert main(args + ["--resume"]) == 0
    rows = list(csv.reader(open(csv_path)))
    assert len(rows) == 2 and rows[1] == first


def test_train_prints_epochs_when_not_quiet(tmp_path, capsys):
    assert main(["train", "-m", "dummy_cli", *SMALL[:-1], "--seeds", "1", "--epochs", "2", "--out",
                 str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "epoch 1:" in text and "epoch 2:" in text and "mean·100" in text


@pytest.mark.parametrize("extra, message", [
    (["--set", "nope=1"], "unknown config keys"),
    (["--set", "oops"], "key=value"),
    (["--missing", "lnln:2"], "rate"),
    (["--data", "/no/such/file.pkl"], "no/such"),
])
def test_train_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    args = ["train", "-m", "dummy_cli", *SMALL, "--seeds", "1", "--epochs", "1", "--out", str(tmp_path)]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert "msa-fast train: error:" in err and message in err


def test_eval_rejects_wrong_model(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "-m", "dummy_cli", *SMALL, "--seeds", "1", "--epochs", "1", "--out", str(out)]) == 0
    ckpt = out / "checkpoints" / "dummy_cli-mosi-seed1" / "last.pt"
    assert main(["eval", "-m", "dashfusion", "--checkpoint", str(ckpt), *SMALL]) == 2
    assert "holds model 'dummy_cli'" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), *SMALL]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("isolation", [["--in-process"], []])
def test_bench_models_cli(capsys, isolation):
    from msa_fast.bench.models import available_models

    if "hme" not in available_models(["hme"]):
        pytest.skip("msa_fast/models/hme/bench.py not present")
    rc = main(["bench", "models", "--models", "hme", "--batch-size", "1", "--modes", "forward", "--variants",
               "bert", "--backends", "torch", "--repeats", "1", "--warmup", "0", *isolation])
    assert rc == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("hme")]
    assert len(row) == 1 and "tiny-bert" in row[0] and "forward" in row[0]
    header = out.splitlines()[0].split()
    assert header[:7] == ["model", "variant", "work", "backend", "mode", "batch", "ms"]
    assert ("peak_rss_mb" in header) == (not isolation)  # memory only from the per-case subprocess


# ---- runs own their folder, resume checks its configuration, eval re-reads the run's data ------------------------
def _train(out, *extra):
    return main(["train", "-m", "dummy_cli", *SMALL, "--seeds", "1", "--epochs", "2", "--out", str(out), *extra])


def test_second_run_into_a_locked_folder_is_refused(tmp_path, capsys):
    import os

    from msa_fast.rundir import RunLock

    with RunLock(tmp_path, command="msa-fast train -m other"):  # another live run holds the folder
        assert _train(tmp_path) == 2
    err = capsys.readouterr().err
    assert "in use by another run" in err and f"pid {os.getpid()}" in err and "msa-fast train -m other" in err
    assert not (tmp_path / "results").exists()  # nothing written into the other run's folder
    assert _train(tmp_path) == 0  # released: the folder is usable again


def test_resume_refuses_a_changed_configuration_and_extends_epochs(tmp_path, capsys):
    assert _train(tmp_path, "--set", "hidden=3") == 0
    assert _train(tmp_path, "--set", "hidden=5", "--resume") == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "model.hidden: 3 → 5" in err
    assert _train(tmp_path, "--set", "hidden=3", "--lr", "0.5", "--resume") == 2
    assert "lr: 0.01 → 0.5" in capsys.readouterr().err
    # more epochs extend a run that finished at its last epoch (constant learning rate)
    assert main(["train", "-m", "dummy_cli", *SMALL, "--seeds", "1", "--epochs", "3", "--out", str(tmp_path),
                 "--set", "hidden=3", "--resume", "--early-stop", "3"]) == 2  # early_stop changed: refused too
    assert "early_stop" in capsys.readouterr().err
    assert main(["train", "-m", "dummy_cli", *SMALL, "--seeds", "1", "--epochs", "3", "--out", str(tmp_path),
                 "--set", "hidden=3", "--resume"]) == 0
    detail = json.load(open(tmp_path / "results" / "normal" / "dummy_cli-mosi.json"))
    assert [r["epoch"] for r in detail["runs"][0]["history"]] == [1, 2, 3]
    assert len(list(csv.reader(open(tmp_path / "results" / "normal" / "mosi.csv")))) == 2


def test_eval_reuses_the_recorded_data_protocol_and_batch_size(tmp_path, capsys):
    assert main(["train", "-m", "dummy_cli", "--data", "synthetic", "--n-train", "24", "--n-valid", "12",
                 "--n-test", "20", "--synthetic-seed", "7", "--quiet", "--seeds", "3", "--epochs", "2",
                 "--out", str(tmp_path), "--missing", "modality:0.4", "--batch-size", "5"]) == 0
    detail = json.load(open(tmp_path / "results" / "missing-modality_0.4" / "dummy_cli-mosi-modality_0.4.json"))
    ckpt = tmp_path / "checkpoints" / "dummy_cli-mosi-modality_0.4-seed3" / "best.pt"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(ckpt)]) == 0  # no --data, no --missing: the checkpoint's
    got = _json_line(capsys.readouterr().out)["metrics"]
    expected = detail["per_seed"][0]
    assert {k: got[k] for k in expected} == pytest.approx(expected)


def test_eval_refuses_when_the_recorded_data_is_gone_or_changed(tmp_path, capsys):
    from msa_fast.data.synthetic import save_mmsa, synthetic

    data = tmp_path / "d.pkl"
    save_mmsa(synthetic("mosi", 24, 12, 12, seed=1), data)
    assert _train(tmp_path / "runs", "--data", str(data)) == 0
    ckpt = tmp_path / "runs" / "checkpoints" / "dummy_cli-mosi-seed1" / "best.pt"
    assert main(["eval", "--checkpoint", str(ckpt)]) == 0
    save_mmsa(synthetic("mosi", 30, 12, 12, seed=1), data)
    assert main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "has changed since" in capsys.readouterr().err
    data.unlink()
    assert main(["eval", "--checkpoint", str(ckpt)]) == 2
    assert "no longer exists: pass --data" in capsys.readouterr().err


def test_eval_of_a_run_folder_covers_every_seed_and_saves_predictions(tmp_path, capsys):
    assert main(["train", "-m", "dummy_cli", *SMALL, "--seeds", "1", "2", "--epochs", "1", "--out", str(tmp_path),
                 "--save-predictions"]) == 0
    preds = list(csv.reader(open(tmp_path / "results" / "normal" / "predictions" / "dummy_cli-mosi-seed2.csv")))
    assert preds[0] == ["id", "label", "prediction"] and len(preds) == 1 + 16
    log = (tmp_path / "logs" / "dummy_cli-mosi.log").read_text()
    assert "seed 2: best epoch" in log and "epoch 1: train Loss" in log  # the log has what --quiet hid
    capsys.readouterr()
    out_csv = tmp_path / "eval.csv"
    assert main(["eval", "--checkpoint", str(tmp_path), "--save-predictions", str(out_csv)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 3 and lines[-1]["checkpoints"] == 2 and "MAE" in lines[-1]["row (mean*100, std*100)"]
    detail = json.load(open(tmp_path / "results" / "normal" / "dummy_cli-mosi.json"))
    assert lines[1]["metrics"]["MAE"] == pytest.approx(detail["per_seed"][1]["MAE"])
    assert len(list(csv.reader(open(out_csv)))) == 1 + 2 * 16


def test_stale_checkpoint_temporaries_are_removed(tmp_path):
    folder = tmp_path / "checkpoints" / "dummy_cli-mosi-seed1"
    folder.mkdir(parents=True)
    stale = folder / ".last.pt.k3j2.tmp"  # what atomic_save leaves when killed mid-write
    stale.write_bytes(b"partial")
    assert _train(tmp_path) == 0
    assert not stale.exists() and (folder / "last.pt").exists()


@pytest.mark.parametrize("make, extra, message", [
    ("file_out", [], "is a file, not a folder"),
    (None, ["--set", "hidden=abc"], "must be an integer (default 4), got 'abc'"),
    (None, ["--set", "early_stop=soon"], "early_stop must be an integer"),
    (None, ["--device", "foo"], "--device must be cpu, cuda, cuda:N or auto, got 'foo'"),
    ("mosei_data", ["-d", "mosi"], "audio"),
    ("wide_labels", [], "allow-label-range"),
    ("empty_valid", [], "valid"),
])
def test_problems_are_reported_before_any_work(tmp_path, capsys, make, extra, message):
    from msa_fast.data.synthetic import save_mmsa, synthetic

    out, args = tmp_path / "runs", []
    if make == "file_out":
        out.write_text("not a folder")
    elif make is not None:
        data = synthetic("mosei" if make == "mosei_data" else "mosi", 24, 12, 12, seed=0)
        if make == "wide_labels":
            data["train"]["regression_labels"][:3] = 7.5
        if make == "empty_valid":
            data["valid"] = {k: v[:0] for k, v in data["valid"].items()}
        save_mmsa(data, tmp_path / "d.pkl")
        args = ["--data", str(tmp_path / "d.pkl")]
    assert main(["train", "-m", "dummy_cli", *SMALL, "--seeds", "1", "--epochs", "1", "--out", str(out), *args,
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (out / "checkpoints").exists()  # refused before the first epoch


def test_labels_out_of_range_are_allowed_with_a_flag(tmp_path, capsys):
    from msa_fast.data.synthetic import save_mmsa, synthetic

    data = synthetic("mosi", 24, 12, 12, seed=0)
    data["train"]["regression_labels"][:3] = 7.5
    save_mmsa(data, tmp_path / "d.pkl")
    assert _train(tmp_path / "runs", "--data", str(tmp_path / "d.pkl"), "--allow-label-range") == 0


@pytest.mark.parametrize("content", [b"plain text, not a checkpoint", "pickle", "truncated"])
def test_eval_refuses_files_that_are_not_checkpoints(tmp_path, capsys, content):
    import pickle

    path = tmp_path / "x.pt"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"a": 1}))
    elif content == "truncated":
        assert _train(tmp_path / "runs") == 0
        full = (tmp_path / "runs" / "checkpoints" / "dummy_cli-mosi-seed1" / "best.pt").read_bytes()
        path.write_bytes(full[: len(full) // 2])
    else:
        path.write_bytes(content)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "is not" in err and "checkpoint" in err and "weights_only=False" not in err and "Traceback" not in err


def test_mmsa_config_files_are_accepted(tmp_path, capsys):
    cfg = tmp_path / "config_regression.json"
    cfg.write_text(json.dumps({"dummy_cli": {
        "commonParams": {"need_data_aligned": False, "use_bert": True, "use_finetune": True,
                         "transformers": "bert", "early_stop": 8, "KeyEval": "MAE"},
        "datasetParams": {"mosi": {"learning_rate": 0.005, "batch_size": 8, "hidden": 3}}}}))
    assert main(["train", "-m", "dummy_cli", *SMALL[:-1], "--seeds", "1", "--epochs", "1", "--out", str(tmp_path),
                 "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "ignored MMSA pipeline keys" in out and "use_bert" in out
    state = torch.load(tmp_path / "checkpoints" / "dummy_cli-mosi-seed1" / "last.pt", weights_only=True)
    assert state["train_config"]["lr"] == 0.005 and state["train_config"]["key_eval"] == "MAE"
    assert state["config"]["hidden"] == 3
