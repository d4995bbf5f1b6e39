"""The domain-generalisation protocol: train on source dataset(s), select on *source* validation data, test once on
an unseen target dataset (``msa-fast train -m MODEL --protocol dg --source mosi,mosei --target sims``).

Works for every registered model that reads unaligned features (one configuration reads every domain after
harmonisation). The steps, in order:

1. Domains: ``--source`` (one or more of mosi / mosei / sims, comma separated) and ``--target`` (one, not a
   source): leave-one-dataset-out (two sources) and single-source → target pairs. ``--data synthetic`` generates
   them with ``msa_fast.data.domains.synthetic_domains`` (shared planted signal, shifted shortcut); otherwise
   ``--data mosi=PATH,sims=PATH,...`` names one MMSA pickle per domain. Each pickle is validated and pre-flight
   checked against its own dataset's dims.
2. Harmonisation (``msa_fast.data.harmonise``): a fixed, data-independent map per (domain, modality) into a shared
   ``shared_dim`` space (default; ``harmonise="standardise"`` z-scores with each domain's train inputs first — it
   reads the target's unlabelled inputs, so it is not strict DG), every sequence padded to the common length with
   its real length kept (masks; nothing truncated), labels on the [-1, 1] scale, a domain id per sample (sources
   0..S-1 in ``--source`` order, the target S: unseen). The model is built from the *first source's*
   configuration with the shared dims / lengths; a model whose config has ``num_domains`` gets S.
3. Training on the sources' train splits, model selection on the sources' validation splits only (the trainer's
   ``key_eval``; metrics of the [-1, 1] family, i.e. the SIMS metric set). The target's data is not read by the
   trainer at all; its test split is built and evaluated once, after training, with the selected weights.
4. Report: the target's native scale (predictions × 3 for MOSI / MOSEI) with the target's native MMSA metric set,
   or ``report_scale="normalised"``: both on [-1, 1] with the [-1, 1] (SIMS) metric set, comparable across targets.
   Results CSV ``<out>/results/dg/<target>[-normalised].csv``: one row per (model, sources, text encoder, scales,
   harmonisation) with those as columns, cells (mean·100, std·100) over seeds; per-seed details in a JSON beside it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..data.dataset import MMSADataset
from ..data.harmonise import HARMONISATIONS, common_lengths, concat_splits, harmonise_domain
from ..data.specs import DATASETS, get_dataset_spec
from ..metrics import compute_metrics, results_row, write_results_csv
from ..rundir import RunLock, RunLog, check_output_dir, clean_stale_temporaries
from ..train_args import SMOKE_EPOCHS, SMOKE_SIZES
from . import loop
from .config import DEFAULT_SEEDS, TrainConfig, _resolve_device, _split_overrides, read_config_file
from .data import _needs_aligned, _synthetic_sizes, check_data
from .state import set_seed

REPORT_SCALES = ("native", "normalised")
#: The metric family of labels on [-1, 1] (validation during training, ``report_scale="normalised"``).
UNIT_SCALE_METRICS = "sims"
TRAIN_SCALE = "[-1,1]"
DEFAULT_SHARED_DIM = 64
SMOKE_LENGTH_SCALE = 0.2  # synthetic domains under --smoke: every sequence 5x shorter


def parse_domains(source: Optional[str | Sequence[str]], target: Optional[str]) -> tuple[list[str], str]:
    """``("mosi,mosei", "sims") -> (["mosi", "mosei"], "sims")``; ValueError naming the flag otherwise."""
    known = sorted(DATASETS)
    if not source:
        raise ValueError(f"--protocol dg needs --source (one or more of {known}, comma separated)")
    if not target:
        raise ValueError(f"--protocol dg needs --target (one of {known})")
    items = source.split(",") if isinstance(source, str) else list(source)
    sources = [s.strip().lower() for s in items if s.strip()]
    bad = [s for s in sources if s not in DATASETS]
    if bad or not sources:
        raise ValueError(f"--source: unknown dataset(s) {bad or [source]}; choose from {known}")
    if len(set(sources)) != len(sources):
        raise ValueError(f"--source names a dataset twice: {sources}")
    tgt = target.strip().lower()
    if "," in tgt:
        raise ValueError(f"--target takes one dataset, got {target!r}")
    if tgt not in DATASETS:
        raise ValueError(f"--target: unknown dataset {target!r}; choose from {known}")
    if tgt in sources:
        raise ValueError(f"--target {tgt} is also a source: the target domain must be unseen in training")
    return sources, tgt


def _parse_data_paths(data: str, names: Sequence[str]) -> dict[str, str]:
    """``"mosi=a.pkl,sims=b.pkl"`` → {name: path} covering every domain of the experiment."""
    paths: dict[str, str] = {}
    for item in str(data).split(","):
        name, sep, path = item.partition("=")
        if not sep or name.strip().lower() not in DATASETS:
            raise ValueError(f"--data for --protocol dg is 'synthetic' or NAME=PICKLE,NAME=PICKLE,... (NAME in "
                             f"{sorted(DATASETS)}), got {data!r}")
        paths[name.strip().lower()] = path.strip()
    missing = [n for n in names if n not in paths]
    if missing:
        raise ValueError(f"--data names no pickle for {missing} (give NAME=PICKLE for every source and the target)")
    return paths


def load_domains(data: str | Mapping[str, Any], names: Sequence[str], seed: int = 0,
                 sizes: Optional[Mapping[str, Optional[int]]] = None, length_scale: float = 1.0,
                 trusted: bool = False) -> dict[str, dict]:
    """{name: validated MMSA dict} for each domain: synthetic domains, a dict of dicts, or NAME=PATH pickles."""
    from ..data.domains import synthetic_domains
    from ..data.mmsa import load_mmsa

    if isinstance(data, Mapping):
        raw = {n: data[n] for n in names}
    elif str(data) == "synthetic":
        raw = synthetic_domains(list(names), seed=seed, length_scale=length_scale,
                                **_synthetic_sizes(dict(sizes or {})))
    else:
        paths = _parse_data_paths(str(data), names)
        for n in names:
            if not Path(paths[n]).is_file():
                raise FileNotFoundError(f"--data {n}={paths[n]}: no such file")
        raw = {n: paths[n] for n in names}
    return {n: load_mmsa(raw[n], trusted=trusted) for n in names}


def text_encoder_name(config: Mapping[str, Any]) -> str:
    """What the results record as the text encoder."""
    if config.get("use_text_features"):
        return "precomputed features"
    bert = config.get("bert")
    if isinstance(bert, Mapping):
        return f"random BertConfig ({bert.get('num_hidden_layers', '?')} layers)"
    return str(bert)


def run_dg(model_name: str, source: str | Sequence[str], target: str, data: str | Mapping[str, Any] = "synthetic",
           config_file: Optional[str] = None, config: Optional[Mapping[str, Any]] = None,
           seeds: Optional[Sequence[int]] = None, harmonise: str = "projection",
           shared_dim: int = DEFAULT_SHARED_DIM, report_scale: str = "native", epochs: Optional[int] = None,
           batch_size: Optional[int] = None, lr: Optional[float] = None, device: str = "cpu",
           out_dir: str | os.PathLike = "msa_fast_runs", key_eval: Optional[str] = None,
           early_stop: Optional[int] = None, resume: bool = False, quiet: bool = False, synthetic_seed: int = 0,
           n_train: Optional[int] = None, n_valid: Optional[int] = None, n_test: Optional[int] = None,
           length_scale: Optional[float] = None, trust_pickle: bool = False, allow_label_range: bool = False,
           smoke: bool = False) -> dict[str, Any]:
    """Run the DG protocol (module docstring) for ``model_name`` once per seed.

    Returns ``{"per_seed": [target metrics], "row": {metric: (mean·100, std·100)}, "csv": path, "runs": [fit
    results], "sources", "target", "text_encoder"}``.
    """
    from ..models.registry import build, get_config, get_model_class

    model_name = model_name.lower()
    cls = get_model_class(model_name)
    sources, target = parse_domains(source, target)
    if harmonise not in HARMONISATIONS:
        raise ValueError(f"--harmonise must be one of {HARMONISATIONS}, got {harmonise!r}")
    if report_scale not in REPORT_SCALES:
        raise ValueError(f"--report-scale must be one of {REPORT_SCALES}, got {report_scale!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--protocol dg runs in one process (no --nproc / torchrun yet)")
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    if config_file is not None:
        overrides, notes = read_config_file(config_file, model_name, sources[0])
    overrides.update(dict(config or {}))
    sizes = {"n_train": n_train, "n_valid": n_valid, "n_test": n_test}
    if smoke:
        from .run import smoke_model_overrides

        overrides = {**smoke_model_overrides(model_name), **overrides}
        epochs = SMOKE_EPOCHS if epochs is None else epochs
        sizes = _synthetic_sizes(sizes, SMOKE_SIZES)
        length_scale = SMOKE_LENGTH_SCALE if length_scale is None else length_scale
    model_over, train_over = _split_overrides(model_name, sources[0], overrides)
    base_config = get_config(model_name, sources[0], **model_over)
    if _needs_aligned(base_config):
        raise ValueError(f"model {model_name!r} is configured for word-aligned features; the DG protocol "
                         "harmonises unaligned data: configure it for unaligned input (e.g. --set alignment="
                         "word_align for hme)")
    _resolve_device(device)
    if not seeds:
        seeds = list(base_config.get("seeds") or DEFAULT_SEEDS)
    out_dir = check_output_dir(out_dir)
    res_dir, ckpt_root = out_dir / "results" / "dg", out_dir / "checkpoints"
    run_name = f"{model_name}-dg-{'+'.join(sources)}-to-{target}"

    with _locked(out_dir):
        for stale in clean_stale_temporaries(ckpt_root):
            notes.append(f"removed {stale} (left by an interrupted checkpoint write)")
        log = RunLog(out_dir / "logs" / f"{run_name}.log", quiet=quiet)
        log.write(f"== msa-fast dg run: {model_name}, sources {sources} → target {target}, seeds {list(seeds)}, "
                  f"command: {' '.join(sys.argv)}")
        for note in notes:
            log.say(f"note: {note}")
        names = [*sources, target]
        raw = load_domains(data, names, seed=synthetic_seed, sizes=sizes, length_scale=length_scale or 1.0,
                           trusted=trust_pickle)
        preflight_config = {k: v for k, v in base_config.items() if k not in ("audio_dim", "vision_dim")}
        for name in names:  # each domain against its own dataset's dims and label range
            for warning in check_data(raw[name], model_name, preflight_config, name, allow_label_range,
                                      source=f"domain {name}"):
                log.say(f"warning: {warning}")
        lengths = common_lengths(list(raw.values()))
        harmonised = {name: harmonise_domain(raw[name], name, i, lengths, harmonise, shared_dim)
                      for i, name in enumerate(names)}
        del raw
        shape = {"audio_dim": shared_dim, "vision_dim": shared_dim, "text_len": lengths["text"],
                 "audio_len": lengths["audio"], "vision_len": lengths["vision"]}
        if "num_domains" in base_config:
            shape["num_domains"] = len(sources)
        model_over = {**model_over, **shape}
        model_config = get_config(model_name, sources[0], **model_over)
        encoder = text_encoder_name(model_config)
        languages = {get_dataset_spec(n).language for n in names}
        if len(languages) > 1 and not model_config.get("use_text_features") and "multilingual" not in encoder:
            log.say(f"warning: cross-lingual experiment ({', '.join(sorted(languages))}) with text encoder "
                    f"{encoder!r}; the spec recommends a multilingual encoder (--set bert=/path/to/"
                    "bert-base-multilingual-cased)")
        use_tf = bool(model_config.get("use_text_features", False)) or None
        train = MMSADataset(concat_splits([harmonised[s]["train"] for s in sources]), use_text_features=use_tf,
                            validate=False, split="train")
        valid = MMSADataset(concat_splits([harmonised[s]["valid"] for s in sources]), use_text_features=use_tf,
                            validate=False, split="valid")
        target_test = harmonised[target]["test"]
        del harmonised
        log.say(f"harmonised ({harmonise}, shared dim {shared_dim}, lengths text {lengths['text']} / audio "
                f"{lengths['audio']} / vision {lengths['vision']}); train {len(train)} / valid {len(valid)} source "
                f"samples; text encoder {encoder}")
        source_desc = {"kind": "in-memory", "protocol": "dg", "sources": sources, "target": target,
                       "data": "<in memory>" if isinstance(data, Mapping) else str(data)}

        per_seed, runs = [], []
        for seed in seeds:
            set_seed(int(seed))
            model = build(model_name, dataset=sources[0], **model_over)
            cfg = TrainConfig(**{**train_over, "dataset": UNIT_SCALE_METRICS, "seed": int(seed), "device": device,
                                 "resume": resume, "quiet": quiet, "data_source": source_desc,
                                 "checkpoint_dir": str(ckpt_root / f"{run_name}-seed{seed}"),
                                 "log_file": str(log.path)})
            for name, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr), ("key_eval", key_eval),
                                ("early_stop", early_stop)):
                if value is not None:
                    setattr(cfg, name, value)
            log.say(f"== {model_name}: {'+'.join(sources)} → {target}, seed {seed} ==")
            trainer = loop.Trainer(model, train, valid, None, cfg)  # no target data in training or selection
            result = trainer.fit()
            metrics = evaluate_target(trainer, target_test, target, report_scale)
            log.say(f"seed {seed}: best epoch {result['best_epoch']} (source valid {trainer.cfg.key_eval} "
                    f"{result['best_valid']}); target {target} ({report_scale}) "
                    + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            result["test"] = metrics
            per_seed.append(metrics)
            runs.append(result)

        row = results_row(per_seed)
        label = model_name + (f" ({cls.provenance})" if getattr(cls, "provenance", "") else "")
        info = {"source": "+".join(sources), "target": target, "text_encoder": encoder, "train_scale": TRAIN_SCALE,
                "report_scale": report_scale, "harmonise": f"{harmonise}:{shared_dim}"}
        csv_path = res_dir / (f"{target}.csv" if report_scale == "native" else f"{target}-normalised.csv")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_results_csv(csv_path, label, row, info=info)
        detail = {"model": model_name, **info, "seeds": list(map(int, seeds)), "per_seed": per_seed,
                  "row": {k: list(v) for k, v in row.items()}, "runs": runs,
                  "note": "CSV cells are (mean*100, std*100)"}
        with open(csv_path.parent / f"{run_name}.json", "w") as f:
            json.dump(detail, f, indent=1, default=float)
        log.say(f"results ({len(seeds)} seeds, target {target}, {report_scale} scale, mean·100 ± std·100) → "
                f"{csv_path}")
        for k, (m, s) in row.items():
            log.say(f"  {k:<14} {m:7.2f} ± {s:.2f}")
    return {"per_seed": per_seed, "row": row, "csv": str(csv_path), "runs": runs, "sources": sources,
            "target": target, "text_encoder": encoder}


def evaluate_target(trainer: "loop.Trainer", split: Mapping[str, Any], target: str,
                    report_scale: str = "native") -> dict[str, float]:
    """The one evaluation of the target's test split with the selected (best source-validation) weights; metrics in
    the target's native scale and metric set, or on [-1, 1] with the [-1, 1] metric set."""
    trainer.load_best()
    use_tf = bool(getattr(trainer.model, "config", {}).get("use_text_features", False)) or None
    dataset = MMSADataset(split, use_text_features=use_tf, validate=False, split="test")
    out = loop.evaluate(trainer.model, dataset, UNIT_SCALE_METRICS, trainer.cfg.eval_batch_size, trainer.device,
                        None, "test", return_predictions=True)
    pred = out["predictions"].double().numpy()
    if report_scale == "normalised":
        return compute_metrics(pred, np.asarray(split["regression_labels"], dtype=np.float64), UNIT_SCALE_METRICS)
    native = np.asarray(split["regression_labels_native"], dtype=np.float64)
    from ..data.domains import label_unit

    return compute_metrics(pred * label_unit(target), native, target)


class _locked:
    """The output folder's ``RunLock`` for the duration of a run."""

    def __init__(self, out_dir: Path):
        self.lock = RunLock(out_dir)

    def __enter__(self):
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False
