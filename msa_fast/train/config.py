"""Trainer settings: ``TrainConfig`` (one spelling per key, filled from the model config), the selection-metric
rule, the device, and user overrides (``--set``, JSON / MMSA config files) checked by name and type."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Sequence

import torch

from ..train_args import DEFAULT_MISSING_SEED


DEFAULT_SEEDS = (1111, 1112, 1113, 1114, 1115)  # MMSA_run's default
_MINIMISED = ("loss", "mae")


def is_minimised(key_eval: str) -> bool:
    """``Loss`` and ``MAE`` are minimised, every other metric maximised (MMSA's ``KeyEval`` rule)."""
    return key_eval.lower() in _MINIMISED


# ---- configuration ----------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Trainer settings. ``None`` = take it from the model config (see ``resolve``), else the default in brackets.

    epochs [config ``epochs``; None = until early stop], batch_size [``batch_size``; 32], eval_batch_size
    [``eval_batch_size``; = batch_size], lr [``lr`` / ``learning_rate``; 1e-3], weight_decay [``weight_decay``;
    0], bert_lr [``bert_lr`` / ``learning_rate_bert``; = lr], warmup_epochs [``warmup_epochs`` or
    ``warmup_ratio``·epochs; 0], lr_schedule [``lr_schedule``; "constant"], schedule_step ("batch" | "epoch")
    [``schedule_step``; "batch"], early_stop [``early_stop`` /
    ``patience``; 8], key_eval [``KeyEval`` / ``key_eval`` / ``checkpoint_metric``; "Loss"], grad_clip (norm)
    [``grad_clip``; none], grad_clip_value (element-wise) [``grad_clip_value``; none], adam_epsilon
    [``adam_epsilon``; 1e-8], reset_optimizer_each_epoch [``reset_optimizer_each_epoch``; False — HME's official
    per-epoch re-creation of the optimizer, a pipeline bug kept only behind this flag].
    """

    dataset: Optional[str] = None  # default: model.config["dataset"]
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    eval_batch_size: Optional[int] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    bert_lr: Optional[float] = None
    warmup_epochs: Optional[float] = None
    lr_schedule: Optional[str] = None
    schedule_step: Optional[str] = None
    early_stop: Optional[int] = None
    key_eval: Optional[str] = None
    grad_clip: Optional[float] = None
    grad_clip_value: Optional[float] = None
    adam_epsilon: Optional[float] = None
    reset_optimizer_each_epoch: Optional[bool] = None
    select_on: str = "valid"
    seed: int = 1111
    device: str = "cpu"
    #: under several ranks, what a cross-sample objective sees: "global" (the global batch, gathered with
    #: gradient: the single-process meaning) or "local" (this rank's shard only; cheaper, a different objective)
    cross_sample: str = "global"
    missing: Optional[str] = None
    missing_train: Optional[str] = None
    missing_seed: int = DEFAULT_MISSING_SEED
    checkpoint_dir: Optional[str] = None  # None = no checkpoints (best weights kept in memory)
    resume: bool = False
    quiet: bool = False
    data_source: Optional[dict] = None  # recorded in checkpoints so ``eval`` re-reads the same data (see run)
    save_predictions: bool = False  # fit() returns the test predictions (``result["predictions"]``)
    log_file: Optional[str] = None  # every log line is appended here too (``run`` sets <out>/logs/<run>.log)

    def resolve(self, model_config: Mapping[str, Any]) -> "TrainConfig":
        """A copy with every ``None`` filled from ``model_config`` or the default, validated."""
        c = copy.copy(self)

        def pick(value, keys, default):
            if value is not None:
                return value
            for k in keys:
                if model_config.get(k) is not None:
                    return model_config[k]
            return default

        c.dataset = pick(c.dataset, ("dataset",), None)
        c.epochs = pick(c.epochs, ("epochs",), None)
        c.batch_size = pick(c.batch_size, ("batch_size",), 32)
        c.eval_batch_size = pick(c.eval_batch_size, ("eval_batch_size",), c.batch_size)
        c.lr = float(pick(c.lr, ("lr", "learning_rate"), 1e-3))
        c.weight_decay = float(pick(c.weight_decay, ("weight_decay",), 0.0))
        c.bert_lr = pick(c.bert_lr, ("bert_lr", "learning_rate_bert"), None)
        if c.warmup_epochs is None:
            if model_config.get("warmup_epochs") is not None:
                c.warmup_epochs = float(model_config["warmup_epochs"])
            elif model_config.get("warmup_ratio") is not None and c.epochs is not None:
                c.warmup_epochs = float(model_config["warmup_ratio"]) * c.epochs
            else:
                c.warmup_epochs = 0.0
        c.lr_schedule = pick(c.lr_schedule, ("lr_schedule",), "constant")
        c.schedule_step = pick(c.schedule_step, ("schedule_step",), "batch")
        c.early_stop = pick(c.early_stop, ("early_stop", "patience"), 8)
        c.key_eval = pick(c.key_eval, ("KeyEval", "key_eval", "checkpoint_metric"), "Loss")
        c.grad_clip = pick(c.grad_clip, ("grad_clip",), None)
        c.grad_clip_value = pick(c.grad_clip_value, ("grad_clip_value",), None)
        for name in ("grad_clip", "grad_clip_value"):  # MMSA writes -1.0 for "no clipping"
            if getattr(c, name) is not None and float(getattr(c, name)) <= 0:
                setattr(c, name, None)
        c.adam_epsilon = float(pick(c.adam_epsilon, ("adam_epsilon",), 1e-8))
        c.reset_optimizer_each_epoch = bool(pick(c.reset_optimizer_each_epoch, ("reset_optimizer_each_epoch",),
                                                 False))
        c.validate()
        return c

    def validate(self) -> None:
        if self.dataset is None:
            raise ValueError("dataset must be given (TrainConfig.dataset or model.config['dataset'])")
        for name in ("batch_size", "eval_batch_size", "early_stop"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be a positive int or None (until early stop), got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {self.lr_schedule!r}")
        if self.schedule_step not in ("batch", "epoch"):
            raise ValueError(f"schedule_step must be 'batch' or 'epoch', got {self.schedule_step!r}")
        if self.lr_schedule != "constant" and self.epochs is None:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} needs a fixed number of epochs")
        if self.select_on not in ("valid", "test_per_metric"):
            raise ValueError(f"select_on must be 'valid' or 'test_per_metric', got {self.select_on!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if self.cross_sample not in ("global", "local"):
            raise ValueError(f"cross_sample must be 'global' or 'local', got {self.cross_sample!r}")

def _resolve_device(device: str) -> torch.device:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``auto`` → ``torch.device``; ValueError naming the argument otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev

def _parse_value(key: str, text: str) -> Any:
    if key == "bert" and text.strip().lower() == "tiny":
        from ..nn.text_encoder import TINY_BERT_CONFIG

        return dict(TINY_BERT_CONFIG)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        low = text.strip().lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def parse_overrides(items: Sequence[str] | None) -> dict[str, Any]:
    """``["d_model=32", "bert=tiny", "lr=1e-3"]`` → dict (values parsed as JSON where possible; ``bert=tiny`` →
    ``TINY_BERT_CONFIG``)."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = _parse_value(key.strip(), value.strip())
    return out


def _trainer_value_kind(name: str) -> Optional[type]:
    """The scalar type of a ``TrainConfig`` field (``Optional[int]`` → int), None for anything else."""
    typ = str(next(f.type for f in fields(TrainConfig) if f.name == name))
    for kind in (bool, int, float, str):
        if typ == kind.__name__ or typ == f"Optional[{kind.__name__}]":
            return kind
    return None


def _split_overrides(model_name: str, dataset_name: str, overrides: Mapping[str, Any]) -> tuple[dict, dict]:
    """Split user overrides into model-config keys and trainer (``TrainConfig``) keys; unknown keys and values of
    the wrong type fail with one line naming them."""
    from ..models.registry import check_value_type, get_config

    if "bert" in overrides and isinstance(overrides["bert"], str) and overrides["bert"].lower() == "tiny":
        overrides = {**overrides, "bert": _parse_value("bert", "tiny")}
    model_keys = set(get_config(model_name, dataset_name))
    trainer_keys = {f.name for f in fields(TrainConfig)} - {"dataset", "seed", "checkpoint_dir", "resume",
                                                            "data_source", "log_file", "save_predictions"}
    model_over = {k: v for k, v in overrides.items() if k in model_keys}
    train_over = {k: v for k, v in overrides.items() if k not in model_keys and k in trainer_keys}
    unknown = sorted(set(overrides) - set(model_over) - set(train_over))
    if unknown:
        raise ValueError(f"unknown config keys {unknown} for model {model_name!r}: model keys {sorted(model_keys)}; "
                         f"trainer keys {sorted(trainer_keys)}")
    for key, value in train_over.items():
        kind = _trainer_value_kind(key)
        if kind is not None and value is not None:
            check_value_type(key, value, kind(), f"trainer setting {key}")
    return model_over, train_over


#: MMSA ``config_regression.json`` keys with a trainer meaning here (MMSA name → ours).
MMSA_KEY_MAP = {"learning_rate": "lr", "KeyEval": "key_eval", "learning_rate_bert": "bert_lr"}
#: MMSA keys that describe MMSA's own pipeline (feature files, model wiring) and mean nothing here.
MMSA_PIPELINE_KEYS = frozenset({
    "need_model_aligned", "need_normalized", "use_bert", "use_finetune", "transformers", "pretrained",
    "update_epochs", "featurePath", "feature_T", "feature_A", "feature_V", "seq_lens", "feature_dims",
    "train_samples", "num_classes", "language", "dataset_name", "model_name", "custom_feature", "train_mode",
    "cur_seed", "KeyEval_mode", "weight_decay_bert", "res_save_dir", "model_save_dir", "log_dir", "is_tune",
    "mode", "save_labels", "model_save_path", "device", "gpu_ids", "num_workers", "verbose_level",
})


def read_config_file(path: str | os.PathLike, model_name: str, dataset_name: str) -> tuple[dict, list[str]]:
    """Overrides from a JSON file (flat, or MMSA's nested ``config_regression.json``), MMSA keys mapped to ours
    (``MMSA_KEY_MAP``; ``need_data_aligned`` kept for the data loader); returns ``(overrides, notes)`` where the
    notes name the MMSA keys ignored. Unknown non-MMSA keys still fail later (a typo must not pass silently)."""
    try:
        with open(path) as f:
            loaded = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"--config {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path} must hold a JSON object of overrides")
    flat = flatten_mmsa_config(loaded, model_name, dataset_name, str(path))
    out: dict[str, Any] = {}
    ignored = sorted(k for k in flat if k in MMSA_PIPELINE_KEYS)
    for key, value in flat.items():
        if key in MMSA_PIPELINE_KEYS:
            continue
        out[MMSA_KEY_MAP.get(key, key)] = value
    notes = [f"--config {path}: ignored MMSA pipeline keys with no meaning here: {', '.join(ignored)}"] if ignored \
        else []
    return out, notes


def flatten_mmsa_config(loaded: Mapping[str, Any], model_name: str, dataset_name: str,
                        source: str = "config") -> dict[str, Any]:
    """A flat dict of overrides from either a flat JSON object or MMSA's nested ``config_regression.json`` layout
    ``{model: {"commonParams": {...}, "datasetParams": {dataset: {...}}}}`` (dataset params win over common ones).
    A nested file without an entry for ``model_name`` is an error, not an empty override."""
    nested = {k: v for k, v in loaded.items()
              if isinstance(v, Mapping) and ({"commonParams", "datasetParams"} & set(v))}
    if not nested:
        return dict(loaded)
    entry = next((v for k, v in nested.items() if k.lower() == model_name), None)
    if entry is None:
        raise ValueError(f"{source} is in MMSA's nested layout but has no entry for model {model_name!r} "
                         f"(it has {sorted(nested)})")
    out = dict(entry.get("commonParams", {}))
    per_dataset = {k.lower(): v for k, v in entry.get("datasetParams", {}).items()}
    out.update(per_dataset.get(dataset_name, {}))
    return out

