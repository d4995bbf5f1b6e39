"""``run`` (MMSA's ``MMSA_run``: every seed, results CSV), ``evaluate_checkpoint``, the demo's short run and the
smoke configuration."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..data.dataset import MMSADataset
from ..data.missing import parse_missing
from ..metrics import results_row, write_results_csv
from ..rundir import OutputDirInUse, RunLock, RunLog, check_output_dir, clean_stale_temporaries
from ..train_args import DEFAULT_MISSING_SEED, SMOKE_EPOCHS, SMOKE_SIZES, SYNTHETIC_SIZES
from .config import DEFAULT_SEEDS, TrainConfig, _resolve_device, _split_overrides, read_config_file
from .state import _load, set_seed
from .loop import MissingSchedule, Trainer, evaluate, refresh_train_state
from .data import (_data_from_source, _needs_aligned, _synthetic_sizes, check_data, describe_data_source, load_data,
                   write_predictions)
from .dist import DistContext, init_from_env, rank_device


# ---- MMSA_run equivalent -----------------------------------------------------------------------------------
def run(model_name: str, dataset_name: str = "mosi", config_file: Optional[str] = None,
        config: Optional[Mapping[str, Any]] = None, seeds: Optional[Sequence[int]] = None,
        data: str | os.PathLike | Mapping[str, Any] = "synthetic", missing: Optional[str] = None,
        missing_train: Optional[str] = None, epochs: Optional[int] = None, batch_size: Optional[int] = None,
        lr: Optional[float] = None, device: str = "cpu", out_dir: str | os.PathLike = "msa_fast_runs",
        key_eval: Optional[str] = None, early_stop: Optional[int] = None, resume: bool = False,
        quiet: bool = False, synthetic_seed: int = 0, n_train: Optional[int] = None, n_valid: Optional[int] = None,
        n_test: Optional[int] = None, res_save_dir: Optional[str] = None, model_save_dir: Optional[str] = None,
        select_on: str = "valid", trust_pickle: bool = False, allow_label_range: bool = False,
        save_predictions: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Train ``model_name`` on ``dataset_name`` once per seed, select on valid, test once, write MMSA's results CSV.

    Argument names follow ``MMSA_run`` (``config_file`` = a JSON dict of overrides, ``config`` = a dict of overrides,
    model-config keys and ``TrainConfig`` keys mixed; ``seeds`` default: the model config's ``seeds`` else MMSA's
    [1111..1115]). ``res_save_dir`` / ``model_save_dir`` default to ``<out_dir>/results`` / ``<out_dir>/checkpoints``.

    Before any epoch: arguments, the output folder and the data are checked (``check_data``), each problem one line.
    While it runs the run owns ``out_dir`` (``RunLock``: a second run into it is refused) and logs to
    ``<out_dir>/logs/<run>.log``. The results CSV holds one row per model (a re-run replaces its row).
    ``smoke``: the model's tiny configuration, synthetic ``SMOKE_SIZES`` and ``SMOKE_EPOCHS`` epoch(s) unless
    ``epochs`` is given.

    Returns ``{"per_seed": [test metrics per seed], "row": {metric: (mean·100, std·100)}, "csv": path, "runs":
    [fit results]}``.
    """
    from ..models.registry import build, get_config, get_model_class

    model_name, dataset_name = model_name.lower(), dataset_name.lower()
    get_model_class(model_name)  # unknown model: fail before anything else
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    if config_file is not None:
        overrides, notes = read_config_file(config_file, model_name, dataset_name)
    overrides.update(dict(config or {}))
    aligned_request = bool(overrides.pop("need_data_aligned", False))
    sizes = {"n_train": n_train, "n_valid": n_valid, "n_test": n_test}
    if smoke:
        overrides = {**smoke_model_overrides(model_name), **overrides}
        epochs = SMOKE_EPOCHS if epochs is None else epochs  # an explicit epoch count wins
        sizes = _synthetic_sizes(sizes, SMOKE_SIZES)
    model_over, train_over = _split_overrides(model_name, dataset_name, overrides)
    model_config = get_config(model_name, dataset_name, **model_over)
    ctx = init_from_env(device)  # torchrun: this process is one rank of several (DDP)
    device = rank_device(device, ctx)
    _resolve_device(device)
    if seeds is None or len(seeds) == 0:
        seeds = list(model_config.get("seeds") or DEFAULT_SEEDS)
    schedule = MissingSchedule.from_spec(missing, 0, train_spec=missing_train)  # a bad spec fails here
    out_dir = check_output_dir(out_dir)
    res_dir = check_output_dir(res_save_dir) if res_save_dir else out_dir / "results"
    ckpt_root = check_output_dir(model_save_dir) if model_save_dir else out_dir / "checkpoints"
    tag = "normal" if schedule is None else f"missing-{schedule.tag}"
    run_name = f"{model_name}-{dataset_name}" + ("" if schedule is None else f"-{schedule.tag}")

    with _main_rank_lock(out_dir, ctx):
        if ctx.is_main:
            for stale in clean_stale_temporaries(ckpt_root):
                notes.append(f"removed {stale} (left by an interrupted checkpoint write)")
        log = RunLog(out_dir / "logs" / f"{run_name}.log" if ctx.is_main else None, quiet=quiet or not ctx.is_main)
        log.write(f"== msa-fast run: {model_name} on {dataset_name}, seeds {list(seeds)}, data "
                  f"{'<in memory>' if isinstance(data, Mapping) else data}, command: {' '.join(sys.argv)}")
        for note in notes:
            log.say(f"note: {note}")
        aligned = _needs_aligned(model_config) or aligned_request
        data_dict, report = load_data(data, dataset_name, seed=synthetic_seed, aligned=aligned,
                                      trusted=trust_pickle, return_report=True, **sizes)
        source = describe_data_source(data, dataset_name, synthetic_seed, aligned, sizes)
        for warning in check_data(data_dict, model_name, model_config, dataset_name, allow_label_range,
                                  source="--data " + ("<in memory>" if isinstance(data, Mapping) else str(data)),
                                  load_report=report):
            log.say(f"warning: {warning}")
        use_tf = bool(model_config.get("use_text_features", False))
        splits = {s: MMSADataset(data_dict[s], use_text_features=use_tf or None, validate=False, split=s)
                  for s in ("train", "valid", "test")}

        per_seed, runs = [], []
        for seed in seeds:
            set_seed(int(seed))
            model = build(model_name, dataset=dataset_name, **model_over)
            cfg = TrainConfig(**{**train_over, "dataset": dataset_name, "seed": int(seed), "device": device,
                                 "missing": missing, "missing_train": missing_train, "resume": resume,
                                 "quiet": quiet, "checkpoint_dir": str(ckpt_root / f"{run_name}-seed{seed}"),
                                 "select_on": select_on, "data_source": source,
                                 "log_file": str(log.path) if log.path else None,
                                 "save_predictions": save_predictions})
            for name, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("key_eval", key_eval),
                                ("early_stop", early_stop)):
                if value is not None:
                    setattr(cfg, name, value)
            trainer = Trainer(model, splits["train"], splits["valid"], splits["test"], cfg)
            log.say(f"== {model_name} on {dataset_name}, seed {seed} ==")
            result = trainer.fit()
            test_m = {k: v for k, v in result["test"].items() if k != "Loss"}
            log.say(f"seed {seed}: best epoch {result['best_epoch']} (valid {trainer.cfg.key_eval} "
                    f"{result['best_valid']}); test " + ", ".join(f"{k} {v:.4f}" for k, v in test_m.items()))
            if save_predictions and ctx.is_main:
                pred_path = res_dir / tag / "predictions" / f"{run_name}-seed{seed}.csv"
                write_predictions(pred_path, splits["test"], result.pop("predictions"))
                log.say(f"test predictions → {pred_path}")
            per_seed.append(test_m)
            runs.append(result)

        row = results_row(per_seed)
        csv_path = res_dir / tag / f"{dataset_name}.csv"
        if not ctx.is_main:  # one writer of the results
            return {"per_seed": per_seed, "row": row, "csv": str(csv_path), "runs": runs}
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        provenance = getattr(get_model_class(model_name), "provenance", "")  # e.g. MIDG: a reconstruction
        write_results_csv(csv_path, model_name + (f" ({provenance})" if provenance else ""), row)
        detail = {"model": model_name, "dataset": dataset_name, "seeds": list(map(int, seeds)),
                  "missing": None if schedule is None else schedule.describe(), "data_source": source,
                  "per_seed": per_seed, "row": {k: list(v) for k, v in row.items()}, "runs": runs,
                  "note": "CSV cells are (mean*100, std*100)"}
        with open(csv_path.parent / f"{run_name}.json", "w") as f:
            json.dump(detail, f, indent=1, default=float)
        log.say(f"results ({len(seeds)} seeds, mean·100 ± std·100; MAE 71.3 = 0.713) → {csv_path}")
        for k, (m, s) in row.items():
            log.say(f"  {k:<14} {m:7.2f} ± {s:.2f}")
    return {"per_seed": per_seed, "row": row, "csv": str(csv_path), "runs": runs}

@contextlib.contextmanager
def _main_rank_lock(out_dir, ctx: DistContext):
    """The run's folder lock, held by the main rank; every rank learns whether it was granted, so a refused run
    stops on all ranks at once instead of leaving the others waiting in a collective."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = RunLock(out_dir).acquire()
        except OutputDirInUse as err:
            error = str(err)
    error = ctx.gather_in_order(error)[0] if ctx.active else error
    if error:
        raise OutputDirInUse(error)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: Any = None, dataset_name: Optional[str] = None,
                        model_name: Optional[str] = None, missing: Optional[str] = None, split: str = "test",
                        batch_size: Optional[int] = None, device: str = "cpu", missing_seed: Optional[int] = None,
                        trusted: bool = False, allow_label_range: bool = False, return_predictions: bool = False,
                        **synthetic_kwargs: Any) -> dict[str, Any]:
    """Metrics of a ``best.pt`` / ``last.pt`` checkpoint on one split (the model is rebuilt from its stored config).

    ``data`` / ``missing`` / ``batch_size`` / ``missing_seed`` default to what the checkpoint recorded (the data
    source it was trained on, its protocol, its evaluation batch size): eval reproduces the run's test numbers, and
    refuses (ValueError) when that data cannot be found instead of evaluating on something else. ``missing="none"``
    evaluates on complete data."""
    from ..models.registry import get_model_class

    state = _load(checkpoint)
    stored_name, stored_ds = state.get("model_name"), state.get("dataset")
    if model_name is not None and stored_name and model_name.lower() != stored_name:
        raise ValueError(f"checkpoint {checkpoint} holds model {stored_name!r}, not {model_name!r}")
    if dataset_name is not None and stored_ds and dataset_name.lower() != stored_ds:
        raise ValueError(f"checkpoint {checkpoint} was trained on {stored_ds!r}, not {dataset_name!r}")
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")
    name, ds = model_name or stored_name, dataset_name or stored_ds
    dev = _resolve_device(device)
    model = get_model_class(name)(state["config"])
    model.load_state_dict_checked(state["model"], f"checkpoint {checkpoint}")
    model.to(dev)
    if data is None:
        data_dict = _data_from_source(state.get("data_source"), checkpoint, trusted)
        source = "the checkpoint's data"
    else:
        sizes = _synthetic_sizes({k: synthetic_kwargs.get(k) for k in SYNTHETIC_SIZES})
        data_dict = load_data(data, ds, seed=synthetic_kwargs.get("seed") or 0,
                              aligned=_needs_aligned(state["config"]), trusted=trusted, **sizes)
        source = "--data " + ("<in memory>" if isinstance(data, Mapping) else str(data))
    check_data(data_dict, name, state["config"], ds, allow_label_range, source=source)
    use_tf = bool(state["config"].get("use_text_features", False))
    dataset = MMSADataset(data_dict[split], use_text_features=use_tf or None, validate=False, split=split)
    refresh_train_state(model, MMSADataset(data_dict["train"], use_text_features=use_tf or None, validate=False,
                                           split="train"))
    spec = state.get("missing") if missing is None else missing
    seed = state.get("missing_seed", DEFAULT_MISSING_SEED) if missing_seed is None else missing_seed
    protocol = parse_missing(spec, seed=seed)
    bs = batch_size or state.get("eval_batch_size") or 32
    results = evaluate(model, dataset, ds, bs, dev, protocol, split, return_predictions=return_predictions)
    if return_predictions:
        results["dataset"] = dataset
    return results


def find_checkpoints(folder: str | os.PathLike, model_name: Optional[str] = None,
                     dataset_name: Optional[str] = None) -> list[Path]:
    """Every ``best.pt`` under ``folder`` (a run's ``--out`` or its ``checkpoints/``), sorted."""
    found = sorted(Path(folder).rglob("best.pt"))
    if model_name:
        found = [p for p in found if p.parent.name.startswith(f"{model_name.lower()}-")]
    if dataset_name:
        found = [p for p in found if f"-{dataset_name.lower()}" in p.parent.name]
    if not found:
        raise ValueError(f"no best.pt under {folder}" + (f" for model {model_name!r}" if model_name else "")
                         + (f" on {dataset_name!r}" if dataset_name else ""))
    runs = sorted({p.parent.name.rsplit("-seed", 1)[0] for p in found})
    if len(runs) > 1:
        raise ValueError(f"{folder} holds checkpoints of several runs {runs}: pick one with -m / -d / --missing or "
                         f"give a folder of one run")
    return found


# ---- demo -------------------------------------------------------------------------------------------------
def short_training_run(quick: bool = True, model_name: str = "hme", seed: int = 1111) -> str:
    """A few epochs of a tiny configuration of ``model_name`` (``TINY_CONFIG``) on synthetic MOSI with the full
    protocol (select on valid, test once); returns the printed text. ``quick``: 128/64/64 samples, 4 epochs
    (a few seconds on one CPU core); otherwise 512/128/128 samples, 10 epochs."""
    from ..models.registry import build, get_config

    overrides = smoke_model_overrides(model_name)
    n_train, n_eval, epochs = (128, 64, 4) if quick else (512, 128, 10)
    config = get_config(model_name, "mosi", **overrides)
    data = load_data("synthetic", "mosi", seed=0, aligned=_needs_aligned(config), n_train=n_train, n_valid=n_eval,
                     n_test=n_eval)
    set_seed(seed)
    model = build(model_name, dataset="mosi", **overrides)
    cfg = TrainConfig(epochs=epochs, batch_size=16, eval_batch_size=64, quiet=True, seed=seed, early_stop=epochs,
                      key_eval="MAE", lr=1e-3, warmup_epochs=0)
    start = time.perf_counter()
    result = Trainer(model, data["train"], data["valid"], data["test"], cfg).fit()
    const_mae = float(np.mean(np.abs(data["test"]["regression_labels"] - data["train"]["regression_labels"].mean())))
    lines = [f"training {model_name} (tiny config, synthetic MOSI {n_train}/{n_eval}/{n_eval}, seed {seed}):"]
    for rec in result["history"]:
        lines.append(f"  epoch {rec['epoch']}: train Loss {rec['train']['Loss']:.4f}  valid MAE "
                     f"{rec['valid']['MAE']:.4f}  Corr {rec['valid']['Corr']:.4f}")
    t = result["test"]
    lines.append(f"  test (best valid epoch {result['best_epoch']}): MAE {t['MAE']:.4f} (constant-mean predictor "
                 f"{const_mae:.4f}), Corr {t['Corr']:.4f}, Has0_acc_2 {t['Has0_acc_2']:.4f} "
                 f"[{time.perf_counter() - start:.1f} s]")
    text = "\n".join(lines)
    print(text)
    return text


# ---- CLI handlers (parsers: msa_fast.train_args) -----------------------------------------------------------
def smoke_model_overrides(model_name: str) -> dict[str, Any]:
    """The model's ``TINY_CONFIG`` with the tiny BERT: what ``--smoke``, the demo and the contract tests run."""
    from ..models.registry import get_model_class
    from ..nn.text_encoder import TINY_BERT_CONFIG

    tiny = dict(getattr(get_model_class(model_name), "TINY_CONFIG", {"use_text_features": True}))
    return {"bert": dict(TINY_BERT_CONFIG), **tiny}

