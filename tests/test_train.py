"""Trainer tests on tiny registered dummy models (fast, CPU): selection on valid, test once, atomic and resumable
checkpoints, MMSA results CSV, determinism, missing-data schedules, optimizer / schedule."""
from __future__ import annotations

import copy
import csv
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from msa_fast.data.batch import Batch
from msa_fast.data.synthetic import synthetic
from msa_fast.models.base import MSAModel
from msa_fast.models.registry import register
from msa_fast.train import (MissingSchedule, TrainConfig, Trainer, atomic_save, build_optimizer, build_scheduler,
                            parse_overrides, run, short_training_run)


@register("dummy_train")
class DummyLinear(MSAModel):
    """Linear regression on masked-mean audio / vision and mean text features, with dropout (uses the RNG)."""

    CONFIGS = {"common": {"hidden": 8, "dropout": 0.2, "lr": 1e-2, "batch_size": 16, "early_stop": 8},
               "mosi": {}, "sims": {}}

    def __init__(self, config):
        super().__init__(config)
        c = self.config
        self.proj = nn.Linear(c["audio_dim"] + c["vision_dim"] + c["text_dim"], c["hidden"])
        self.drop = nn.Dropout(c["dropout"])
        self.bert_like = nn.Linear(c["hidden"], 1)  # a name containing "bert" for the bert_lr test

    def forward(self, batch: Batch):
        a = _masked_mean(batch.audio, batch.audio_padding_mask)
        v = _masked_mean(batch.vision, batch.vision_padding_mask)
        t = batch.text_features.mean(1)
        h = torch.tanh(self.proj(torch.cat([a, v, t], dim=-1)))
        return {"M": self.bert_like(self.drop(h)).squeeze(-1), "h": h}

    def loss(self, batch, outputs):
        mse = nn.functional.mse_loss(outputs["M"], batch.labels)
        return {"loss": mse, "mse": mse}


def _masked_mean(x, pad):
    keep = (~pad).float()[..., None]
    return (x * keep).sum(1) / keep.sum(1).clamp(min=1)


SCRIPT = (0.0, 1.0, -1.0, 2.0, 0.5)  # the constant the scripted model predicts at epoch e (1-based)


@register("dummy_scripted")
class ScriptedConstant(MSAModel):
    """Predicts a scripted constant per epoch (set in ``prepare_epoch``); the loss has zero gradient so AdamW never
    moves it. Lets a test know exactly which epoch's weights produced a number."""

    CONFIGS = {"common": {"batch_size": 16}, "mosi": {}}

    def __init__(self, config):
        super().__init__(config)
        self.c = nn.Parameter(torch.zeros(()))

    def prepare_epoch(self, epoch, train_data):
        with torch.no_grad():
            self.c.fill_(SCRIPT[epoch - 1])

    def forward(self, batch):
        return {"M": self.c.expand(batch.batch_size)}

    def loss(self, batch, outputs):
        return {"loss": 0.0 * outputs["M"].sum() + nn.functional.l1_loss(outputs["M"].detach(), batch.labels)}


@pytest.fixture(scope="module")
def data():
    return synthetic("mosi", n_train=48, n_valid=24, n_test=24, seed=3)


def _build(name, seed=7, **over):
    from msa_fast.models.registry import build
    from msa_fast.train import set_seed

    set_seed(seed)
    return build(name, dataset="mosi", **over)


def _cfg(**kw):
    base = dict(epochs=3, batch_size=16, quiet=True, seed=7)
    base.update(kw)
    return TrainConfig(**base)


# ---- selection on valid, test once -----------------------------------------------------------------------
def _with_labels(split, value, rng):
    out = dict(split)
    out["regression_labels"] = (value + 0.1 * rng.standard_normal(len(split["regression_labels"]))).astype(
        np.float32)
    return out


@pytest.mark.parametrize("key_eval", ["MAE", "Loss"])
def test_selects_on_valid_not_test(data, key_eval):
    rng = np.random.default_rng(0)
    valid = _with_labels(data["valid"], 1.0, rng)  # best valid epoch: 2 (predicts 1.0)
    test = _with_labels(data["test"], -1.0, rng)  # best test epoch would be 3 (predicts -1.0)
    model = _build("dummy_scripted")
    trainer = Trainer(model, data["train"], valid, test, _cfg(epochs=5, key_eval=key_eval, early_stop=10))
    result = trainer.fit()
    assert result["best_epoch"] == 2
    expected_test_mae = float(np.mean(np.abs(SCRIPT[1] - test["regression_labels"])))
    assert result["test"]["MAE"] == pytest.approx(expected_test_mae, abs=1e-4)
    assert model.c.item() == SCRIPT[1]  # the selected weights are loaded
    # the test split was not evaluated during training
    assert all("test" not in rec for rec in result["history"])


def test_test_per_metric_is_the_leaky_official_protocol(data):
    rng = np.random.default_rng(0)
    valid, test = _with_labels(data["valid"], 1.0, rng), _with_labels(data["test"], -1.0, rng)
    trainer = Trainer(_build("dummy_scripted"), data["train"], valid, test,
                      _cfg(epochs=5, key_eval="MAE", early_stop=10, select_on="test_per_metric"))
    result = trainer.fit()
    assert result["test"]["MAE"] == pytest.approx(float(np.mean(np.abs(-1.0 - test["regression_labels"]))),
                                                  abs=1e-4)


def test_early_stop_patience(data):
    rng = np.random.default_rng(0)
    valid = _with_labels(data["valid"], 1.0, rng)
    result = Trainer(_build("dummy_scripted"), data["train"], valid, data["test"],
                     _cfg(epochs=5, key_eval="MAE", early_stop=2)).fit()
    assert [r["epoch"] for r in result["history"]] == [1, 2, 3, 4]  # best at 2, stops at 2 + 2


# ---- checkpoints ----------------------------------------------------------------------------------------------
def test_atomic_save_keeps_previous_file_on_crash(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pt"
    atomic_save({"v": torch.arange(3)}, path)
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": torch.arange(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(3))
    assert os.listdir(path.parent) == ["last.pt"]  # no temporary file left behind


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_run(data, tmp_path):
    cfg = dict(epochs=4, early_stop=10, lr_schedule="linear", warmup_epochs=1.0)
    full = Trainer(_build("dummy_train"), data["train"], data["valid"], data["test"],
                   _cfg(checkpoint_dir=str(tmp_path / "full"), **cfg)).fit()

    def stop_after_2(trainer, epoch, record):
        if epoch == 2:
            raise _Interrupt

    ck = str(tmp_path / "resumed")
    with pytest.raises(_Interrupt):
        Trainer(_build("dummy_train"), data["train"], data["valid"], data["test"], _cfg(checkpoint_dir=ck, **cfg),
                on_epoch_end=stop_after_2).fit()
    torch.manual_seed(999)  # disturb every RNG: resume must restore them
    np.random.seed(999)
    resumed_model = _build("dummy_train", seed=12345)
    resumed = Trainer(resumed_model, data["train"], data["valid"], data["test"],
                      _cfg(checkpoint_dir=ck, resume=True, **cfg)).fit()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full["history"]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed["history"]] == strip
    assert resumed["test"] == full["test"]
    assert resumed["best_epoch"] == full["best_epoch"]


def test_resume_rejects_other_seed(data, tmp_path):
    ck = str(tmp_path / "ck")
    Trainer(_build("dummy_train"), data["train"], data["valid"], data["test"], _cfg(checkpoint_dir=ck, epochs=1)).fit()
    with pytest.raises(ValueError, match="seed"):
        Trainer(_build("dummy_train"), data["train"], data["valid"], data["test"],
                _cfg(checkpoint_dir=ck, epochs=1, resume=True, seed=8)).fit()


# ---- run(): seeds, determinism, results CSV ---------------------------------------------------------------------
def test_run_is_deterministic_and_writes_mmsa_csv(tmp_path):
    kw = dict(data="synthetic", n_train=48, n_valid=24, n_test=24, epochs=2, quiet=True)
    a = run("dummy_train", "mosi", seeds=[1, 2], out_dir=tmp_path / "a", **kw)
    b = run("dummy_train", "mosi", seeds=[1, 2], out_dir=tmp_path / "b", **kw)
    assert a["per_seed"] == b["per_seed"]
    assert a["per_seed"][0] != a["per_seed"][1]  # different seeds, different numbers
    with open(a["csv"], newline="") as f:
        rows = list(csv.reader(f))
    header, row = rows[0], rows[1]
    assert header == ["Model", "Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_5",
                      "Mult_acc_7", "MAE", "Corr"]
    assert row[0] == "dummy_train"
    for name, cell in zip(header[1:], row[1:]):
        values = [s[name] for s in a["per_seed"]]
        mean, std = sum(values) / 2, math.sqrt(sum((v - sum(values) / 2) ** 2 for v in values) / 2)
        assert cell == f"({round(mean * 100, 2)}, {round(std * 100, 2)})", name  # ×100, MAE and Corr included
    assert a["csv"].endswith(os.path.join("results", "normal", "mosi.csv"))
    # checkpoints per seed
    assert (tmp_path / "a" / "checkpoints" / "dummy_train-mosi-seed1" / "best.pt").exists()


def test_run_rejects_unknown_override(tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        run("dummy_train", "mosi", config={"no_such_key": 1}, seeds=[1], out_dir=tmp_path, n_train=8, n_valid=4,
            n_test=4, epochs=1, quiet=True)


# ---- missing data ------------------------------------------------------------------------------------------------
@register("dummy_recorder")
class Recorder(DummyLinear):
    CONFIGS = DummyLinear.CONFIGS
    seen: list = []

    def forward(self, batch):
        Recorder.seen.append(("train" if self.training else "eval", batch))
        return super().forward(batch)


@pytest.mark.parametrize("spec", ["lnln:0.5", "modality:0.3", "pattern:TA"])
def test_missing_schedules(data, spec):
    Recorder.seen = []
    Trainer(_build("dummy_recorder"), data["train"], data["valid"], data["test"],
            _cfg(epochs=2, missing=spec)).fit()
    train = [b for mode, b in Recorder.seen if mode == "train"]
    evals = [b for mode, b in Recorder.seen if mode == "eval"]
    assert train and evals
    if spec.startswith("lnln"):
        rates = torch.cat([b.missing_rates for b in train])
        assert (rates == 0).any() and ((rates > 0) & (rates != 0.5)).any()  # LNLN training schedule
        assert all(torch.all(b.missing_rates == 0.5) for b in evals)
        assert all(b.complete is not None for b in train + evals)
    elif spec.startswith("modality"):
        avail = torch.cat([b.availability for b in train])
        assert (~avail).any() and avail.any(dim=1).all()
        # evaluation masks are fixed: the same valid samples get the same availability in every epoch
        # (eval order: valid batches 1-2 of epoch 1, of epoch 2, then test batches)
        assert torch.equal(evals[0].index, evals[2].index)
        assert torch.equal(evals[0].availability, evals[2].availability)
    else:
        assert all(b.availability is None for b in train)  # CyIN: trained on complete data
        assert all(torch.equal(b.availability[0], torch.tensor([True, True, False])) for b in evals)


def test_missing_schedule_override_and_errors():
    s = MissingSchedule.from_spec("lnln:0.3", seed=1, train_spec="none")
    assert s.train is None and s.eval.rate == 0.3
    assert MissingSchedule.from_spec(None, seed=1) is None
    with pytest.raises(ValueError, match="missing-data protocol"):
        MissingSchedule.from_spec("bogus:1", seed=1)


# ---- optimizer, schedule, config ----------------------------------------------------------------------------
def test_optimizer_groups_bert_lr_and_weight_decay():
    model = _build("dummy_train")
    cfg = TrainConfig(dataset="mosi", bert_lr=1e-5, weight_decay=0.1).resolve(model.config)
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    by_lr = {g["lr"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert by_lr == {1e-5: 9, 1e-2: sum(p.numel() for p in model.proj.parameters())}  # lr 1e-2 from the config
    assert all(g["weight_decay"] == 0.1 for g in opt.param_groups)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_schedule(schedule):
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    cfg = TrainConfig(dataset="mosi", epochs=4, warmup_epochs=1, lr_schedule=schedule).resolve({})
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    after = lrs[5:]
    if schedule == "constant":
        assert after == pytest.approx([1.0] * 15)
    else:
        assert all(x >= y for x, y in zip(after, after[1:])) and after[-1] < 0.1


def test_per_epoch_schedule_keeps_the_lr_constant_within_an_epoch(data):
    """schedule_step="epoch" (LNLN's official recipe): one scheduler step per epoch, after its last batch."""
    cfg = TrainConfig(dataset="mosi", epochs=4, warmup_epochs=2, lr_schedule="cosine", schedule_step="epoch")
    cfg = cfg.resolve({})
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, cfg, steps_per_epoch=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)  # warm-up epoch 1 of 2
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    seen = []
    trainer = Trainer(_build("dummy_train"), data["train"], data["valid"], data["test"],
                      _cfg(epochs=3, lr_schedule="cosine", warmup_epochs=1.0, schedule_step="epoch"),
                      on_epoch_end=lambda t, e, r: seen.append(r["lr"]))
    trainer.fit()
    base = trainer.cfg.lr
    assert seen == pytest.approx([base, base * 0.5, 0.0])  # lr of the next epoch: warm-up 1, cosine over 2
    with pytest.raises(ValueError, match="schedule_step"):
        TrainConfig(schedule_step="step").resolve({"dataset": "mosi"})


def test_config_resolution_and_validation():
    cfg = TrainConfig().resolve({"dataset": "mosi", "learning_rate": 3e-4, "warmup_ratio": 0.5, "epochs": 10,
                                 "checkpoint_metric": "MAE", "grad_clip": -1.0})
    assert (cfg.lr, cfg.warmup_epochs, cfg.key_eval, cfg.grad_clip, cfg.early_stop) == (3e-4, 5.0, "MAE", None, 8)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).resolve({"dataset": "mosi"})
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear").resolve({"dataset": "mosi"})  # needs epochs
    with pytest.raises(ValueError, match="unknown trainer config keys"):
        Trainer(_build("dummy_train"), {}, {}, {}, {"nope": 1})


def test_parse_overrides():
    from msa_fast.nn.text_encoder import TINY_BERT_CONFIG

    got = parse_overrides(["d_model=32", "bert=tiny", "lr=1e-3", "flag=true", "name=abc"])
    assert got == {"d_model": 32, "bert": TINY_BERT_CONFIG, "lr": 1e-3, "flag": True, "name": "abc"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["oops"])


def test_non_finite_loss_is_reported(data):
    model = _build("dummy_train")
    bad = copy.deepcopy(data["train"])
    bad["regression_labels"] = np.full_like(bad["regression_labels"], 1e30)  # finite, but the MSE overflows
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        Trainer(model, bad, data["valid"], data["test"], _cfg(epochs=1)).fit()


def test_hme_style_config_keys_resolve():
    cfg = TrainConfig().resolve({"dataset": "mosi", "patience": 10, "grad_clip_value": 0.8, "eval_batch_size": 128,
                                 "adam_epsilon": 1e-6, "reset_optimizer_each_epoch": True, "batch_size": 256})
    assert (cfg.early_stop, cfg.grad_clip_value, cfg.eval_batch_size, cfg.adam_epsilon,
            cfg.reset_optimizer_each_epoch) == (10, 0.8, 128, 1e-6, True)


@register("dummy_bank")
class BankModel(DummyLinear):
    """Records ``refresh_train_state`` calls (state derived from the train split, rebuilt after loading weights)."""

    CONFIGS = DummyLinear.CONFIGS
    bank_calls: list = []

    def refresh_train_state(self, train_data):
        BankModel.bank_calls.append((len(train_data), self.proj.weight.detach().clone()))


def test_memory_bank_rebuilt_with_selected_weights(data):
    BankModel.bank_calls = []
    trainer = Trainer(_build("dummy_bank"), data["train"], data["valid"], data["test"],
                      _cfg(epochs=2, grad_clip=1.0, grad_clip_value=0.5, reset_optimizer_each_epoch=True))
    trainer.fit()
    assert len(BankModel.bank_calls) == 1
    n, weight = BankModel.bank_calls[0]
    assert n == 48 and torch.equal(weight, trainer.model.proj.weight)  # built after load_best, with those weights


@pytest.mark.slow
def test_short_training_run_beats_constant_predictor():
    text = short_training_run(quick=True)
    lines = text.splitlines()
    assert sum(line.strip().startswith("epoch") for line in lines) == 4
    test_mae = float(lines[-1].split("MAE ")[1].split()[0])
    const_mae = float(lines[-1].split("predictor ")[1].split(")")[0])
    assert test_mae < const_mae


def test_mmsa_nested_config_file_is_flattened():
    from msa_fast.train import flatten_mmsa_config

    nested = {"lnln": {"commonParams": {"lr": 1e-4, "batch_size": 32},
                       "datasetParams": {"MOSI": {"batch_size": 16}, "sims": {"lr": 5e-5}}},
              "other": {"commonParams": {"lr": 1.0}}}
    assert flatten_mmsa_config(nested, "lnln", "mosi") == {"lr": 1e-4, "batch_size": 16}
    assert flatten_mmsa_config(nested, "lnln", "sims") == {"lr": 5e-5, "batch_size": 32}
    assert flatten_mmsa_config({"lr": 3e-4}, "lnln", "mosi") == {"lr": 3e-4}  # flat files pass through
    with pytest.raises(ValueError, match="no entry for model 'hme'"):
        flatten_mmsa_config(nested, "hme", "mosi")


@register("dummy_two_optimizers")
class TwoOptimizers(DummyLinear):
    """Declares two optimizers (as MMCL's model / actor): the projection at one learning rate, the head at another."""

    CONFIGS = DummyLinear.CONFIGS

    def optimizer_param_groups(self):
        return {"body": [{"params": list(self.proj.parameters())}],
                "head": [{"params": list(self.bert_like.parameters()), "lr": 1e-4}]}


def test_several_optimizers_step_checkpoint_and_resume_exactly(data, tmp_path):
    import msa_fast.train as T

    class Stop(Exception):
        pass

    def kill(trainer, epoch, record):
        if epoch == 1:
            raise Stop

    straight = Trainer(_build("dummy_two_optimizers"), data["train"], data["valid"], data["test"],
                       _cfg(epochs=2, checkpoint_dir=str(tmp_path / "a")))
    assert sorted(straight.optim.optimizers) == ["body", "head"]
    assert straight.optim.optimizers["head"].param_groups[0]["lr"] == 1e-4
    head0 = straight.model.bert_like.weight.detach().clone()
    straight.fit()
    assert not torch.equal(head0, straight.model.bert_like.weight)  # the second optimizer stepped too
    state = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert sorted(state["optim"]["optimizers"]) == ["body", "head"]

    with pytest.raises(Stop):
        Trainer(_build("dummy_two_optimizers"), data["train"], data["valid"], data["test"],
                _cfg(epochs=2, checkpoint_dir=str(tmp_path / "b")), on_epoch_end=kill).fit()
    resumed = Trainer(_build("dummy_two_optimizers"), data["train"], data["valid"], data["test"],
                      _cfg(epochs=2, checkpoint_dir=str(tmp_path / "b"), resume=True))
    resumed.fit()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="2 optimizers"):
        T.build_optimizer(_build("dummy_two_optimizers"), straight.cfg)


@pytest.mark.parametrize("clip", [{"grad_clip_value": 0.8}, {"grad_clip": 1.0}, {}])
def test_update_clips_gradients_as_configured_before_stepping(clip):
    from msa_fast.train.optim import OptimizerSet

    model = nn.Linear(4, 3)
    cfg = TrainConfig(lr=1.0, **clip).resolve({"dataset": "mosi"})
    optim = OptimizerSet(model, cfg, steps_per_epoch=1)
    (model(torch.full((2, 4), 10.0)) * 50).sum().backward()
    raw = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    before = [p.detach().clone() for p in model.parameters()]
    optim.clip_and_step(model, cfg)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    if "grad_clip_value" in clip:
        assert grads.abs().max() == pytest.approx(0.8) and raw.abs().max() > 0.8
    elif "grad_clip" in clip:
        assert grads.norm() == pytest.approx(1.0, rel=1e-5) and raw.norm() > 1.0
    else:
        assert torch.equal(grads, raw)
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # then the step


def test_value_clipping_equals_torchs_clip_grad_value_including_non_finite():
    from msa_fast.train.optim import OptimizerSet

    torch.manual_seed(0)
    a, b = nn.Linear(5, 4), nn.Linear(5, 4)
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 3
        m.weight.grad[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    cfg = TrainConfig(lr=1e-3, grad_clip_value=0.8).resolve({"dataset": "mosi"})
    OptimizerSet(a, cfg, steps_per_epoch=1).clip_and_step(a, cfg)
    nn.utils.clip_grad_value_(b.parameters(), 0.8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad.nan_to_num(7.0), pb.grad.nan_to_num(7.0))
