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
    # resuming a finished run only re-tests the selected checkpoint: same numbers, one more CSV row
    assert main(args + ["--resume"]) == 0
    rows = list(csv.reader(open(csv_path)))
    assert len(rows) == 3 and rows[2] == first


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
        pytest.skip("msa_fast/bench/models_hme.py not present")
    rc = main(["bench", "models", "--models", "hme", "--batch-size", "1", "--modes", "forward", "--variants",
               "bert", "--backends", "torch", "--repeats", "1", "--warmup", "0", *isolation])
    assert rc == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("hme")]
    assert len(row) == 1 and "tiny-bert" in row[0] and "forward" in row[0]
    header = out.splitlines()[0].split()
    assert header[:6] == ["model", "variant", "backend", "mode", "batch", "ms"]
    assert ("peak_rss_mb" in header) == (not isolation)  # memory only from the per-case subprocess
