"""The training loop: ``Trainer`` (epochs, validation-based selection, checkpoints, resume), ``evaluate`` and the
missing-data schedule."""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..data.batch import Batch
from ..data.dataset import MMSADataset
from ..data.missing import MissingProtocol, ModalityDrop, PatternAvailability, TokenErasure, parse_missing
from ..metrics import compute_metrics
from ..rundir import RunLog
from ..train_args import DEFAULT_MISSING_SEED
from .config import TrainConfig, _resolve_device, is_minimised
from .state import _RESUME_FREE_KEYS, _dict_diff, _load, _plain, _rng_state, _set_rng_state, atomic_save
from .dist import DistContext, GlobalBatchShards, loss_weight, wrap_for_training
from .optim import OptimizerSet


# ---- missing-data schedule -----------------------------------------------------------------------------
@dataclass
class MissingSchedule:
    """Which protocol is applied to training and to evaluation batches (see the module docstring)."""

    spec: str
    train: Optional[MissingProtocol]
    eval: Optional[MissingProtocol]

    @classmethod
    def from_spec(cls, spec: Optional[str], seed: int, missing_seed: int = DEFAULT_MISSING_SEED,
                  train_spec: Optional[str] = None) -> Optional["MissingSchedule"]:
        """``spec`` as ``parse_missing``; training masks use the run ``seed``, evaluation masks ``missing_seed``."""
        eval_protocol = parse_missing(spec, seed=missing_seed)
        if eval_protocol is None and train_spec is None:
            return None
        if train_spec is not None:
            train_protocol = parse_missing(train_spec, seed=seed)
        elif isinstance(eval_protocol, TokenErasure):  # LNLN: train with its training schedule
            train_protocol = TokenErasure(rate=None, seed=seed)
        elif isinstance(eval_protocol, ModalityDrop):  # HME: train MR = test MR, redrawn per epoch
            train_protocol = ModalityDrop(mr=eval_protocol.mr, seed=seed)
        elif isinstance(eval_protocol, PatternAvailability):  # CyIN: trained on complete data
            train_protocol = None
        else:  # pragma: no cover - parse_missing returns one of the above
            train_protocol = None
        return cls(spec=str(spec or "none"), train=train_protocol, eval=eval_protocol)

    def describe(self) -> str:
        train = self.train.describe() if self.train is not None else "complete"
        ev = self.eval.describe() if self.eval is not None else "complete"
        return f"train: {train}; valid/test: {ev}"

    @property
    def tag(self) -> str:
        """File-name friendly protocol tag, e.g. ``lnln_0.5``."""
        return "".join(ch if ch.isalnum() or ch in ".-" else "_" for ch in self.spec)

# ---- evaluation -------------------------------------------------------------------------------------------
def _apply(protocol: Optional[MissingProtocol], batch: Batch, epoch: int, split: str) -> Batch:
    return batch if protocol is None else protocol(batch, epoch=epoch, split=split)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: MMSADataset, dataset_name: str, batch_size: int = 32,
             device: torch.device | str = "cpu", protocol: Optional[MissingProtocol] = None, split: str = "test",
             return_predictions: bool = False) -> dict[str, Any]:
    """MMSA metrics of ``model`` on one split (in order, no shuffling) plus ``Loss`` = the model's objective
    averaged over samples. ``protocol`` is applied with fixed masks (epoch 0). Under several ranks each evaluates
    its contiguous shard of the split and the predictions are gathered once, in order (no padded duplicates)."""
    dist = DistContext.current()
    rows = list(dist.shard_range(len(dataset)))
    was_training = model.training
    model.eval()
    prepare = getattr(model, "prepare_evaluation", None)
    if prepare is not None:  # on every rank, before any forward (a rank's shard may be empty)
        prepare()
    preds, truths, loss_sum = [], [], 0.0
    try:
        for start in range(0, len(rows), batch_size):
            batch = _apply(protocol, dataset[rows[start:start + batch_size]].to(device), 0, split)
            outputs = model(batch)
            loss = model.loss(batch, outputs)["loss"]
            preds.append(outputs["M"].detach().float().reshape(-1).cpu())
            truths.append(batch.labels.float().reshape(-1).cpu())
            loss_sum += float(loss) * batch.batch_size
    finally:
        model.train(was_training)
    gathered = dist.gather_in_order((preds, truths, loss_sum))
    preds = [p for g in gathered for p in g[0]]
    truths = [t for g in gathered for t in g[1]]
    loss_sum, n = sum(g[2] for g in gathered), sum(len(p) for p in preds)
    if n == 0:
        raise ValueError(f"split {split!r} is empty: nothing to evaluate")
    pred, truth = torch.cat(preds), torch.cat(truths)
    if not torch.isfinite(pred).all():
        raise FloatingPointError(f"non-finite predictions on the {split} split (diverged training?)")
    results: dict[str, Any] = dict(compute_metrics(pred.numpy(), truth.numpy(), dataset_name))
    results["Loss"] = round(loss_sum / n, 4)
    if return_predictions:
        results["predictions"] = pred
    return results


def _better(value: float, best: Optional[float], minimise: bool) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value < best - 1e-6 if minimise else value > best + 1e-6


def _as_dataset(data: Any, name: str) -> MMSADataset:
    if isinstance(data, MMSADataset):
        return data
    if isinstance(data, Mapping):
        return MMSADataset(data, split=name)
    raise TypeError(f"{name}_data must be an MMSA split dict or an MMSADataset, got {type(data).__name__}")


# ---- trainer ----------------------------------------------------------------------------------------------
class Trainer:
    """Train ``model`` on ``train_data``, select on ``valid_data``, test once on ``test_data``.

    Args:
        model: an ``MSAModel`` (``training_step`` / ``loss`` / ``forward`` / ``prepare_epoch``).
        train_data, valid_data, test_data: MMSA split dicts or ``MMSADataset``.
        config: ``TrainConfig`` (or a dict of its fields); ``None`` fields resolve from ``model.config``.
        on_epoch_end: optional ``callback(trainer, epoch, record)`` after each epoch's checkpoint (tests use it to
            simulate an interruption).

    ``fit()`` returns ``{"best_epoch", "best_valid", "test", "history"}``.
    """

    def __init__(self, model: nn.Module, train_data: Any, valid_data: Any, test_data: Any,
                 config: TrainConfig | Mapping[str, Any] | None = None,
                 on_epoch_end: Optional[Callable[["Trainer", int, dict], None]] = None):
        if config is None:
            config = TrainConfig()
        elif isinstance(config, Mapping):
            known = {f.name for f in fields(TrainConfig)}
            unknown = sorted(set(config) - known)
            if unknown:
                raise ValueError(f"unknown trainer config keys {unknown}; known: {sorted(known)}")
            config = TrainConfig(**config)
        self.cfg = config.resolve(getattr(model, "config", {}))
        self.device = _resolve_device(self.cfg.device)
        self.model = model.to(self.device)
        self.dist = DistContext.current()
        self.step_module = wrap_for_training(
            self.model, self.dist, [self.device.index] if self.device.type == "cuda" and self.dist.active else None)
        self.train_set = _as_dataset(train_data, "train")
        self.valid_set = _as_dataset(valid_data, "valid")
        self.test_set = _as_dataset(test_data, "test") if test_data is not None else None
        if len(self.train_set) == 0:
            raise ValueError("train_data is empty")
        self.missing = MissingSchedule.from_spec(self.cfg.missing, self.cfg.seed, self.cfg.missing_seed,
                                                 self.cfg.missing_train)
        self.steps_per_epoch = math.ceil(len(self.train_set) / self.cfg.batch_size)
        self.optim = OptimizerSet(self.model, self.cfg, self.steps_per_epoch)
        self.minimise = is_minimised(self.cfg.key_eval)
        self.on_epoch_end = on_epoch_end
        self.history: list[dict] = []
        self.best_value: Optional[float] = None
        self.best_epoch = 0
        self.best_state: Optional[dict] = None  # in-memory best weights when no checkpoint_dir
        self.test_best: dict[str, float] = {}  # select_on="test_per_metric" only
        self.start_epoch = 1
        self.finished = False
        self.stop_reason: Optional[str] = None  # "max_epochs" | "early_stop" once finished
        self.ckpt_dir = Path(self.cfg.checkpoint_dir) if self.cfg.checkpoint_dir else None
        self._log_file = RunLog(self.cfg.log_file) if self.cfg.log_file else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The (first) optimizer; ``self.optim`` holds every optimizer the model declares."""
        return self.optim.main

    # -- logging --
    def log(self, msg: str) -> None:
        if not self.dist.is_main:
            return
        if not self.cfg.quiet:
            from tqdm.auto import tqdm

            tqdm.write(msg, file=sys.stdout)
        if self._log_file is not None:
            self._log_file.write(msg)

    def _progress(self, iterable, total: int, desc: str):
        from tqdm.auto import tqdm

        disable = self.cfg.quiet or not sys.stderr.isatty()
        return tqdm(iterable, total=total, desc=desc, leave=False, disable=disable, dynamic_ncols=True)

    # -- checkpoints --
    @property
    def last_path(self) -> Optional[Path]:
        return self.ckpt_dir / "last.pt" if self.ckpt_dir else None

    @property
    def best_path(self) -> Optional[Path]:
        return self.ckpt_dir / "best.pt" if self.ckpt_dir else None

    def _model_record(self, epoch: int) -> dict:
        """``best.pt``: the weights plus what ``eval`` needs to reproduce the test numbers without being told (data
        source, missing-data protocol and its seed, evaluation batch size)."""
        return {"model": self.model.state_dict(), "model_name": getattr(self.model, "model_name", ""),
                "dataset": self.cfg.dataset, "config": _plain(getattr(self.model, "config", {})), "epoch": epoch,
                "key_eval": self.cfg.key_eval, "value": self.best_value, "seed": self.cfg.seed,
                "missing": self.cfg.missing, "missing_seed": self.cfg.missing_seed,
                "eval_batch_size": self.cfg.eval_batch_size, "data_source": _plain(self.cfg.data_source)}

    def _save_last(self, epoch: int) -> None:
        if self.ckpt_dir is None or not self.dist.is_main:
            return
        state = {
            "format": "msa_fast.train/1", "model": self.model.state_dict(),
            "model_name": getattr(self.model, "model_name", ""), "dataset": self.cfg.dataset, "seed": self.cfg.seed,
            "config": _plain(getattr(self.model, "config", {})), "optim": self.optim.state_dict(), "epoch": epoch,
            "rng": _rng_state(), "best_value": self.best_value, "best_epoch": self.best_epoch,
            "history": json.loads(json.dumps(self.history)), "test_best": dict(self.test_best),
            "finished": self.finished, "stop_reason": self.stop_reason, "train_config": _plain(asdict(self.cfg)),
            "missing_seed": self.cfg.missing_seed, "eval_batch_size": self.cfg.eval_batch_size,
            "data_source": _plain(self.cfg.data_source),
            "epoch_state": self.model.epoch_state() if hasattr(self.model, "epoch_state") else {},
        }
        atomic_save(state, self.last_path)

    def _resume(self) -> None:
        path = self.last_path
        if path is None:
            raise ValueError("resume=True needs checkpoint_dir")
        if not path.exists():
            self.log(f"resume: no checkpoint at {path}, starting from epoch 1")
            return
        state = _load(path)
        for key, mine in (("model_name", getattr(self.model, "model_name", "")), ("dataset", self.cfg.dataset),
                          ("seed", self.cfg.seed)):
            if state.get(key) != mine:
                raise ValueError(f"resume: checkpoint {path} has {key}={state.get(key)!r}, this run has {mine!r}")
        extend = self._check_resume_config(state, path)
        self.model.load_state_dict(state["model"])
        if state.get("epoch_state") and hasattr(self.model, "load_epoch_state"):
            self.model.load_epoch_state(state["epoch_state"])
        if "optim" in state:
            self.optim.load_state_dict(state["optim"])
        else:  # a last.pt of the single-optimizer format
            self.optim.load_state_dict({"optimizers": {"main": state["optimizer"]},
                                        "schedulers": {"main": state["scheduler"]}})
        _set_rng_state(state["rng"])
        self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
        self.history, self.test_best = list(state["history"]), dict(state["test_best"])
        self.finished = bool(state["finished"])
        self.stop_reason = state.get("stop_reason")
        self.start_epoch = int(state["epoch"]) + 1
        if extend and self.finished and self.stop_reason == "max_epochs":
            self.finished, self.stop_reason = False, None
            self.log(f"resume: extending the finished run from {state['epoch']} to {self.cfg.epochs} epochs")
        self.log(f"resumed from {path} after epoch {state['epoch']} (best {self.cfg.key_eval} "
                 f"{self.best_value} at epoch {self.best_epoch})")

    def _check_resume_config(self, state: Mapping[str, Any], path: Path) -> bool:
        """Refuse to resume under a different configuration (model config, trainer settings, data), listing every
        difference. Only ``epochs`` may grow, and only with a constant learning rate (the schedule depends on it):
        returns True when it grew, so a run that finished at its last epoch continues."""
        diffs = _dict_diff(state.get("config", {}), _plain(getattr(self.model, "config", {})), "model.")
        old_train = dict(state.get("train_config") or {})
        new_train = _plain(asdict(self.cfg))
        for key in _RESUME_FREE_KEYS:
            old_train.pop(key, None)
            new_train.pop(key, None)
        old_epochs, new_epochs = old_train.pop("epochs", None), new_train.pop("epochs", None)
        diffs += _dict_diff(old_train, new_train, "")
        extend = False
        if old_epochs != new_epochs:
            done = int(state.get("epoch", 0))
            if new_epochs is not None and new_epochs < done:
                diffs.append(f"epochs: {old_epochs} → {new_epochs} (the checkpoint already ran {done} epochs)")
            elif self.cfg.lr_schedule != "constant":  # (a warm-up derived from epochs shows as its own diff)
                diffs.append(f"epochs: {old_epochs} → {new_epochs} (lr_schedule {self.cfg.lr_schedule!r} depends on "
                             f"the number of epochs)")
            else:
                extend = new_epochs is None or old_epochs is None or new_epochs > old_epochs
        if diffs:
            raise ValueError(f"resume: {path} was written with a different configuration; "
                             + "; ".join(diffs)
                             + ". Resume with the original settings, or start a new run (another --out, or "
                               "without --resume)")
        return extend

    # -- one epoch --
    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        if self.cfg.reset_optimizer_each_epoch and epoch > 1:  # official HME behaviour (flag only)
            self.optim = OptimizerSet(self.model, self.cfg, self.steps_per_epoch)
        prepare = getattr(self.model, "prepare_epoch", None)
        if prepare is not None:
            prepare(epoch, self.train_set)
        # order of epoch e = f(seed, e): independent of how many epochs ran before (resume-safe); under several
        # ranks each takes its shard of the same global batches
        shards = GlobalBatchShards(len(self.train_set), self.cfg.batch_size, self.dist.rank, self.dist.world_size,
                                   shuffle=True, seed=self.cfg.seed * 100_003 + epoch)
        self.step_module.train()
        train_protocol = self.missing.train if self.missing else None
        # losses and predictions stay on the device until the epoch ends: no host sync per step (the progress bar,
        # when shown, is the one exception)
        loss_sum, n, preds, truths = torch.zeros((), device=self.device, dtype=torch.float64), 0, [], []
        bar = self._progress(shards, self.steps_per_epoch, f"epoch {epoch}")
        for rows, n_local, n_global in bar:
            batch = _apply(train_protocol, self.train_set[rows].to(self.device), epoch, "train")
            scope = shards.scope(n_global, local=self.cfg.cross_sample == "local") if self.dist.active else None
            out = self.step_module(batch, scope)
            loss = out["loss"]
            self.optim.zero_grad()
            (loss * loss_weight(n_local, n_global, self.dist.world_size)).backward()
            self.optim.clip_and_step(self.model, self.cfg)
            if self.cfg.schedule_step == "batch":
                self.optim.schedule_step()
            if n_local == 0:  # a zero-weight stand-in shard (last batch smaller than the world)
                continue
            loss_sum += loss.detach().double() * n_local
            n += n_local
            preds.append(out["M"].detach().float().reshape(-1))
            truths.append(batch.labels.float().reshape(-1))
            if not bar.disable:
                bar.set_postfix(loss=f"{float(loss_sum) / n:.4f}")
        # the epoch's one host sync (and, under several ranks, its one gather)
        mean_loss = float(self.dist.all_sum(loss_sum)) / float(self.dist.all_sum(torch.tensor(float(n))))
        local = (torch.cat(preds).cpu() if preds else torch.zeros(0), torch.cat(truths).cpu() if truths else
                 torch.zeros(0))
        gathered = self.dist.gather_in_order(local)
        all_preds, all_truths = torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"non-finite training loss ({mean_loss}) in epoch {epoch}: diverged training? "
                                     f"(lower the learning rate or clip gradients)")
        if self.cfg.schedule_step == "epoch":
            self.optim.schedule_step()
        metrics = dict(compute_metrics(all_preds.numpy(), all_truths.numpy(), self.cfg.dataset))
        metrics["Loss"] = round(mean_loss, 4)
        return metrics

    def _evaluate(self, dataset: MMSADataset, split: str) -> dict[str, Any]:
        protocol = self.missing.eval if self.missing else None
        return evaluate(self.model, dataset, self.cfg.dataset, self.cfg.eval_batch_size, self.device, protocol,
                        split)

    # -- the loop --
    def fit(self) -> dict[str, Any]:
        if self.cfg.resume:
            self._resume()
        elif self.best_path is not None and self.best_path.exists() and self.dist.is_main:
            self.best_path.unlink()  # a fresh run must never test a previous run's selection
        self.dist.barrier()
        if self.missing is not None and self.start_epoch == 1:
            self.log(f"missing data: {self.missing.describe()}")
        epoch = self.start_epoch
        max_epochs = self.cfg.epochs if self.cfg.epochs is not None else 10**9
        while not self.finished and epoch <= max_epochs:
            start = time.perf_counter()
            train_m = self.train_epoch(epoch)
            valid_m = self._evaluate(self.valid_set, "valid")
            self.optim.plateau_step(valid_m)  # per-epoch ReduceLROnPlateau of models that declare it
            value = float(valid_m[self.cfg.key_eval]) if self.cfg.key_eval in valid_m else None
            if value is None:
                raise ValueError(f"key_eval {self.cfg.key_eval!r} is not a metric; choose from {sorted(valid_m)}")
            improved = _better(value, self.best_value, self.minimise)
            record = {"epoch": epoch, "train": train_m, "valid": valid_m, "lr": self.optim.last_lr(),
                      "seconds": round(time.perf_counter() - start, 3)}
            if self.cfg.select_on == "test_per_metric" and self.test_set is not None:
                record["test"] = self._evaluate(self.test_set, "test")
                self._update_test_best(record["test"])
            if improved:
                self.best_value, self.best_epoch = value, epoch
                if self.best_path is not None:
                    if self.dist.is_main:
                        atomic_save(self._model_record(epoch), self.best_path)
                else:
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.history.append(record)
            shown = [self.cfg.key_eval] + [k for k in ("MAE", "Corr") if k != self.cfg.key_eval]
            self.log(f"epoch {epoch}: train Loss {train_m['Loss']:.4f} | valid "
                     + " ".join(f"{k} {float(valid_m[k]):.4f}" for k in shown)
                     + (" *best*" if improved else f" (best {self.best_value:.4f} @ {self.best_epoch})"))
            if epoch - self.best_epoch >= self.cfg.early_stop:
                self.log(f"early stop: no {self.cfg.key_eval} improvement for {self.cfg.early_stop} epochs")
                self.finished, self.stop_reason = True, "early_stop"
            elif epoch == max_epochs:
                self.finished, self.stop_reason = True, "max_epochs"
            self._save_last(epoch)
            self.dist.barrier()
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, epoch, record)
            epoch += 1
        result = {"best_epoch": self.best_epoch, "best_valid": self.best_value, "key_eval": self.cfg.key_eval,
                  "history": self.history}
        if self.test_set is not None:
            result["test"] = self.test()
            if "predictions" in result["test"]:
                result["predictions"] = result["test"].pop("predictions")
        return result

    def load_best(self) -> None:
        """Load the selected (best validation) weights into the model."""
        self.dist.barrier()  # the main rank has written best.pt
        if self.best_path is not None and self.best_path.exists():
            self.model.load_state_dict(_load(self.best_path)["model"])
        elif self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        else:
            raise ValueError("no best checkpoint: fit() has not completed an epoch")
        refresh_train_state(self.model, self.train_set)

    def test(self) -> dict[str, Any]:
        """Test metrics of the selected checkpoint (once); with ``select_on="test_per_metric"`` the best test
        value per metric over epochs instead (leaky, reproduction only)."""
        if self.cfg.select_on == "test_per_metric":
            return dict(self.test_best)
        self.load_best()
        protocol = self.missing.eval if self.missing else None
        return evaluate(self.model, self.test_set, self.cfg.dataset, self.cfg.eval_batch_size, self.device,
                        protocol, "test", return_predictions=self.cfg.save_predictions)

    def _update_test_best(self, test_m: Mapping[str, float]) -> None:
        for k, v in test_m.items():
            if _better(float(v), self.test_best.get(k), is_minimised(k)):
                self.test_best[k] = float(v)

def refresh_train_state(model: nn.Module, train_set: MMSADataset) -> None:
    """After loading weights: rebuild state derived from the train split with *these* weights (``MSAModel.
    refresh_train_state``, e.g. HME's memory bank), which is not part of the state_dict."""
    refresh = getattr(model, "refresh_train_state", None)
    if refresh is not None:
        refresh(train_set)

