"""What every method package must satisfy, checked for each registered library model at its ``TINY_CONFIG``
(official parity lives in the per-model files, one fixture each; eval batch-size invariance in
test_eval_invariance.py)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from msa_fast.data.dataset import MMSADataset, make_loader
from msa_fast.data.missing import PatternAvailability
from msa_fast.data.batch import Batch
from msa_fast.models.registry import available_models, build, get_config, get_model_class, method_packages
from msa_fast.train import Trainer, TrainConfig, _needs_aligned, load_data, smoke_model_overrides

MODELS = available_models(library_only=True)


def _data(name: str, n_train: int = 48, n_eval: int = 24, seed: int = 0) -> dict:
    config = get_config(name, "mosi", **smoke_model_overrides(name))
    return load_data("synthetic", "mosi", seed=seed, aligned=_needs_aligned(config), n_train=n_train,
                     n_valid=n_eval, n_test=n_eval)


def _batch(name: str, data: dict, n: int = 6):
    use_tf = bool(get_config(name, "mosi", **smoke_model_overrides(name)).get("use_text_features"))
    train = MMSADataset(data["train"], use_text_features=use_tf or None, validate=False, split="train")
    return train, next(iter(make_loader(train, batch_size=n, shuffle=False)))


def _double(batch: Batch) -> Batch:
    """The batch with its floating tensors in float64 (ids, lengths and masks unchanged)."""
    changes = {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            changes[f.name] = v.double()
        elif isinstance(v, Batch):
            changes[f.name] = _double(v)
    return batch.replace(**changes)


def _ready(model, train):
    """As the trainer leaves a model for evaluation: per-epoch work done, train-derived state built."""
    model.prepare_epoch(1, train)
    model.refresh_train_state(train)
    return model.eval()


def test_every_method_package_is_discovered():
    assert {"dashfusion", "lnln", "hme"} <= set(MODELS)
    for name in MODELS:
        cls = get_model_class(name)
        assert "TINY_CONFIG" in vars(cls), f"{name} declares no TINY_CONFIG of its own"
        assert cls.__module__.split(".")[2] in method_packages()  # lives in its own package


@pytest.mark.parametrize("name", MODELS)
def test_wrong_state_dict_is_a_clear_error(name):
    model = build(name, "mosi", **smoke_model_overrides(name))
    sd = model.state_dict()
    key = sorted(sd)[0]
    del sd[key]
    sd["not.a.parameter"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys.*" + key.replace(".", r"\.") + ".*unexpected keys"):
        model.load_state_dict_checked(sd, f"a {name} state_dict")


@pytest.mark.parametrize("name", MODELS)
def test_fp32_matches_fp64(name):
    data = _data(name)
    torch.manual_seed(0)
    model = build(name, "mosi", **smoke_model_overrides(name))
    train, batch = _batch(name, data)
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        out32 = _ready(model, train)(batch)["M"]
        train64 = copy.copy(train)  # the train split in float64 too (HME's bank is built from it)
        train64.tensors = {k: v.double() if v.is_floating_point() else v for k, v in train.tensors.items()}
        out64 = _ready(model64, train64)(_double(batch))["M"]
    err32 = (out32.double() - out64).abs().max().item()
    assert err32 <= 1e-4 * max(1.0, out64.abs().max().item()), err32


@pytest.mark.parametrize("pattern", ["T", "A", "V"])
@pytest.mark.parametrize("name", MODELS)
def test_fully_missing_modalities_stay_finite(name, pattern):
    data = _data(name)
    torch.manual_seed(0)
    model = build(name, "mosi", **smoke_model_overrides(name))
    train, batch = _batch(name, data)
    missing = PatternAvailability(pattern=pattern)(batch, epoch=0, split="test")
    _ready(model, train)
    with torch.no_grad():
        out = model(missing)
    assert torch.isfinite(out["M"]).all()
    model.train()
    # trained as the modality-drop protocols train (no complete view: LNLN's complete view belongs to its erasure)
    losses = model.training_step(missing.replace(complete=None))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


class _Killed(Exception):
    pass


def _fit(name: str, data: dict, epochs: int, ckpt=None, resume: bool = False, seed: int = 1111,
         kill_after: int | None = None):
    torch.manual_seed(seed)
    model = build(name, "mosi", **smoke_model_overrides(name))
    cfg = TrainConfig(epochs=epochs, batch_size=16, eval_batch_size=32, quiet=True, seed=seed, early_stop=epochs,
                      key_eval="MAE", lr=1e-3, warmup_epochs=0, checkpoint_dir=ckpt, resume=resume)

    def on_epoch_end(trainer, epoch, record):
        if epoch == kill_after:  # the process dies right after this epoch's checkpoint
            raise _Killed

    trainer = Trainer(model, data["train"], data["valid"], data["test"], cfg, on_epoch_end=on_epoch_end)
    try:
        return trainer, trainer.fit()
    except _Killed:
        return trainer, None


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_learns_the_planted_signal(name):
    data = _data(name, n_train=192, n_eval=64)
    _, result = _fit(name, data, epochs=6)
    constant = float(np.mean(np.abs(data["test"]["regression_labels"] - data["train"]["regression_labels"].mean())))
    assert result["test"]["MAE"] < 0.9 * constant, (result["test"]["MAE"], constant)


@pytest.mark.parametrize("name", MODELS)
def test_resume_is_exact(name, tmp_path):
    data = _data(name, n_train=32, n_eval=16)
    straight, _ = _fit(name, data, epochs=2, ckpt=str(tmp_path / "a"))
    _fit(name, data, epochs=2, ckpt=str(tmp_path / "b"), kill_after=1)
    resumed, _ = _fit(name, data, epochs=2, ckpt=str(tmp_path / "b"), resume=True)
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", MODELS)
def test_benchmark_factory_runs(name):
    model, batch = get_model_class(name).bench_inputs(batch_size=2, dataset="mosi")
    assert model.model_name == name and batch.batch_size == 2
    model.train()
    model.prepare_epoch(1, batch)
    model.training_step(batch)["loss"].backward()
