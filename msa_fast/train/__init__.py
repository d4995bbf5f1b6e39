"""Training and evaluation of any registered model: ``Trainer``, ``run`` (MMSA's ``MMSA_run``) and the
``msa-fast train`` / ``msa-fast eval`` commands.

Modules: ``config`` (settings and overrides), ``state`` (checkpoint state, RNG, atomic writes, resume diff),
``optim`` (optimizers, schedules), ``loop`` (``Trainer``, ``evaluate``), ``data`` (loading, pre-flight checks,
predictions), ``run`` (every seed, results CSV, ``evaluate_checkpoint``), ``cli`` (command handlers).

Protocol (MMSA conventions, spec kernels_and_toolchain.md §6, with its pipeline bugs fixed):

- **Model selection on the validation split only.** After every epoch the model is evaluated on *valid*; the epoch
  with the best ``key_eval`` is kept (``best.pt``). The test split is evaluated **once**, with that checkpoint.
  ``key_eval`` (MMSA's ``KeyEval``): ``"Loss"`` (default, as MMSA's MOSI/MOSEI/SIMS configs) = the model's own
  objective ``model.loss(...)["loss"]`` averaged over the valid samples, minimised; ``"MAE"`` minimised; any other
  metric name (``Has0_acc_2``, ``Non0_F1_score``, ``Corr``, ...) maximised. A model config may set the key through
  ``KeyEval`` / ``key_eval`` / ``checkpoint_metric``. An epoch is better only if it improves by more than 1e-6.
- **Early stopping** (MMSA's ``early_stop``, default 8): stop when ``epoch − best_epoch ≥ early_stop``.
- ``select_on="test_per_metric"`` reproduces LNLN's official (leaky) protocol — every metric is the best test value
  over epochs, i.e. selected on test labels. It exists only to reproduce published numbers; never use it for claims.
- **Seeds.** Per seed: ``random``, NumPy and torch are seeded before the model is built, and the training order of
  epoch e comes from a ``torch.Generator`` seeded with (seed, e) — same seed → same numbers, and a resumed run sees
  the same order as an uninterrupted one.
- **Checkpoints** (``<out>/checkpoints/<model>-<dataset>[-<missing>]-seed<seed>/``): ``last.pt`` (model, optimizer,
  scheduler, epoch, RNG states, best metric, history) after every epoch, ``best.pt`` (model + config) whenever the
  selection metric improves. Both are written atomically (temporary file in the same folder + ``os.replace``), so an
  interrupted run never leaves a truncated checkpoint; ``resume=True`` continues from ``last.pt``.
- **Results** (``<out>/results/<normal|missing-…>/<dataset>.csv``): MMSA's CSV — one row per model, each metric as
  ``(round(mean·100, 2), round(std·100, 2))`` over seeds (population std), **MAE and Corr included: a CSV MAE of
  71.3 means 0.713**. Per-seed metrics and per-epoch histories go to ``<out>/results/…/<model>-<dataset>.json``.
- **Missing data** (``missing="lnln:0.5" | "modality:0.3" | "pattern:TA" | ...``, msa_fast.data.missing): masks are
  drawn on the device, from the batch's sample indices. Schedules per protocol (``MissingSchedule``):
  LNLN erasure trains with LNLN's training schedule (rate ~ U(0,1), half the samples complete; new draw every epoch)
  and evaluates valid/test at the given rate; ``modality:MR`` (HME) trains and evaluates at MR, redrawn every training
  epoch; ``pattern:…`` / ``pattern_prob:…`` (CyIN) trains on complete data. Evaluation masks are fixed (epoch 0,
  seed ``missing_seed`` = 1111 as MMSA's ``missing_seed``) so every epoch and every seed is selected and tested on the
  same masks. ``missing_train`` overrides the training protocol (``"none"`` = complete data).
- **Optimizer**: AdamW. Parameter groups from ``model.optimizer_param_groups()`` when the model defines it (e.g.
  DashFusion's official no-decay rule), else one group. ``lr`` / ``weight_decay`` from the trainer arguments, else
  the model config (``lr`` or ``learning_rate``; ``weight_decay``), else 1e-3 / 0. ``bert_lr`` (config ``bert_lr`` or
  MMSA's ``learning_rate_bert``) gives parameters whose name contains ``bert`` their own lr. Schedule (stepped per
  batch, or per epoch with ``schedule_step="epoch"`` as LNLN's official recipe): linear warm-up over
  ``warmup_epochs`` (config ``warmup_epochs``, or ``warmup_ratio`` × epochs), then ``lr_schedule`` = ``constant``
  (default) | ``linear`` (decay to 0) | ``cosine``.
"""
from __future__ import annotations

from .config import (DEFAULT_SEEDS, MMSA_KEY_MAP, MMSA_PIPELINE_KEYS, TrainConfig, flatten_mmsa_config, is_minimised,
                     parse_overrides, read_config_file)
from .config import _resolve_device, _split_overrides  # noqa: F401  (used by tests and older callers)
from .data import check_data, describe_data_source, load_data, write_predictions
from .data import _needs_aligned  # noqa: F401
from .loop import MissingSchedule, Trainer, evaluate, refresh_train_state
from .optim import OptimizerSet, adamw, build_optimizer, build_scheduler
from .run import evaluate_checkpoint, find_checkpoints, run, short_training_run, smoke_model_overrides
from .state import atomic_save, set_seed
from .cli import main_eval, main_train
from ..train_args import DEFAULT_MISSING_SEED, SYNTHETIC_SIZES

__all__ = [
    "TrainConfig", "Trainer", "MissingSchedule", "run", "evaluate", "evaluate_checkpoint", "find_checkpoints",
    "load_data", "check_data", "describe_data_source", "write_predictions", "build_optimizer", "build_scheduler",
    "adamw", "OptimizerSet",
    "flatten_mmsa_config", "read_config_file", "MMSA_KEY_MAP", "MMSA_PIPELINE_KEYS", "atomic_save",
    "set_seed", "parse_overrides", "short_training_run", "smoke_model_overrides", "refresh_train_state",
    "main_train", "main_eval", "DEFAULT_SEEDS", "DEFAULT_MISSING_SEED", "SYNTHETIC_SIZES", "is_minimised",
]
