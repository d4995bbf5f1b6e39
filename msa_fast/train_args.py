"""Argument parsers of ``msa-fast train`` and ``msa-fast eval``.

Kept free of torch so that ``msa-fast --help`` and ``msa-fast train --help`` answer at once; the handlers import
``msa_fast.train`` only when a command actually runs.
"""
from __future__ import annotations

import argparse

from .cli import smoke_requested  # noqa: F401  (re-exported for msa_fast.train)

DEFAULT_MISSING_SEED = 1111  # MMSA's / LNLN's missing_seed
SYNTHETIC_SIZES = {"n_train": 128, "n_valid": 64, "n_test": 64}
#: ``--smoke`` (or MSA_FAST_SMOKE=1): synthetic sizes and epochs of a run that only checks the path works.
SMOKE_SIZES = {"n_train": 32, "n_valid": 16, "n_test": 16}
SMOKE_EPOCHS = 1


def _common_data_args(p: argparse.ArgumentParser, *, for_eval: bool) -> None:
    p.add_argument("-d", "--dataset", default=None if for_eval else "mosi", choices=("mosi", "mosei", "sims"),
                   help="dataset (default: " + ("the checkpoint's" if for_eval else "mosi") + ")")
    p.add_argument("--data", default=None if for_eval else "synthetic",
                   help=("MMSA pickle path, or 'synthetic'; default: the data source recorded in the checkpoint"
                         if for_eval else "MMSA pickle path, or 'synthetic' (small generated data; default)"))
    p.add_argument("--missing", default=None,
                   help="missing-data protocol: lnln:RATE | lnln:train | modality:MR | pattern:TAV|T|... | "
                        "pattern_prob:P | none" + (" (default: the checkpoint's)" if for_eval else " (default none)"))
    p.add_argument("--batch-size", type=int, default=None,
                   help="evaluation batch size (default: the checkpoint's)" if for_eval
                   else "batch size (default: model config, else 32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu)")
    for split in ("train", "valid", "test"):
        p.add_argument(f"--n-{split}", type=int, default=None,
                       help=f"synthetic {split} size (default {SYNTHETIC_SIZES['n_' + split]}"
                            + (", or the checkpoint's)" if for_eval else ")"))
    p.add_argument("--synthetic-seed", type=int, default=None,
                   help="seed of the synthetic data (default 0" + (", or the checkpoint's)" if for_eval else ")"))
    p.add_argument("--trust-pickle", action="store_true",
                   help="load the pickle with Python's full unpickler (it can run code: only for files you trust); "
                        "by default only arrays, numbers, strings and containers are admitted")
    p.add_argument("--allow-label-range", action="store_true",
                   help="accept labels outside the dataset's range (warn instead of refusing)")
    p.add_argument("--smoke", action="store_true",
                   help=f"check the path works at the smallest sizes: tiny model configuration, synthetic "
                        f"{SMOKE_SIZES['n_train']}/{SMOKE_SIZES['n_valid']}/{SMOKE_SIZES['n_test']} samples, "
                        f"{SMOKE_EPOCHS} epoch unless --epochs is given (also MSA_FAST_SMOKE=1, which also "
                        f"drops --epochs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-epoch lines")


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model over seeds (select on valid, test once, MMSA results CSV)",
                       description="Train a registered model once per seed: select the epoch on the validation "
                                   "split, test that checkpoint once, write MMSA's results CSV (cells are "
                                   "(mean*100, std*100) over seeds). The output folder is locked while the run "
                                   "lasts; every run writes a log file under OUT/logs.")
    t.add_argument("-m", "--model", required=True, help="registered model name (msa-fast models lists them)")
    _common_data_args(t, for_eval=False)
    t.add_argument("--missing-train", default=None, help="override the training protocol ('none' = complete)")
    t.add_argument("-s", "--seeds", type=int, nargs="+", action="extend", default=None,
                   help="seeds, '-s 1111 1112' or MMSA's '-s 1111 -s 1112' (default: model config 'seeds', "
                        "else 1111 1112 1113 1114 1115)")
    t.add_argument("--epochs", type=int, default=None,
                   help="max epochs (default: model config, else until early stop); with --resume a larger value "
                        "extends a finished run")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: model config, else 1e-3)")
    t.add_argument("--key-eval", default=None, help="validation selection metric (default: model config, else Loss)")
    t.add_argument("--early-stop", type=int, default=None, help="patience in epochs (default: config, else 8)")
    t.add_argument("--out", default="msa_fast_runs",
                   help="output folder: checkpoints/, results/, logs/ (default msa_fast_runs)")
    t.add_argument("-c", "--config", default=None,
                   help="JSON file of config overrides (model or trainer keys), flat or MMSA's nested "
                        "config_regression.json layout; MMSA's own keys are mapped or ignored with a note")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (JSON values; bert=tiny = the tiny BERT config)")
    t.add_argument("--resume", action="store_true",
                   help="continue each seed from its last.pt (refused if the configuration changed)")
    t.add_argument("--select-on", default="valid", choices=("valid", "test_per_metric"),
                   help="checkpoint selection; test_per_metric = LNLN's leaky official protocol (reproduction only)")
    t.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel training on N processes of this machine through torchrun (gloo on CPU, NCCL on "
                        "GPU); same as torchrun --nproc-per-node N -m msa_fast train ... (default 1)")
    t.add_argument("--cross-sample", default=None, choices=("global", "local"),
                   help="with --nproc > 1: what a cross-sample objective (HME's in-batch retrieval) sees: the global "
                        "batch gathered across ranks (global, the single-process objective; default) or each rank's "
                        "shard (local: cheaper, a different objective)")
    t.add_argument("--save-predictions", action="store_true",
                   help="write each seed's test predictions (id, label, prediction) as CSV under OUT/results")
    _dg_args(t)
    t.set_defaults(func=_train_main)

    e = sub.add_parser("eval", help="evaluate a checkpoint, or every seed of a run, on a split (MMSA metrics)",
                       description="Evaluate best.pt / last.pt on one split with the data source, missing-data "
                                   "protocol and evaluation batch size recorded in the checkpoint (options override "
                                   "them). Given a folder, every best.pt under it is evaluated (all seeds of a run) "
                                   "and the MMSA mean/std row is printed as well.")
    e.add_argument("-m", "--model", default=None, help="model name (checked against the checkpoint)")
    _common_data_args(e, for_eval=True)
    e.add_argument("--checkpoint", required=True,
                   help="best.pt / last.pt written by msa-fast train, or a folder (e.g. the run's --out): every "
                        "best.pt under it")
    e.add_argument("--split", default="test", choices=("train", "valid", "test"), help="split to evaluate (test)")
    e.add_argument("--missing-seed", type=int, default=DEFAULT_MISSING_SEED,
                   help=f"seed of the evaluation masks (default {DEFAULT_MISSING_SEED})")
    e.add_argument("--save-predictions", default=None, metavar="CSV",
                   help="write the predictions (checkpoint, id, label, prediction) to this CSV file")
    e.set_defaults(func=_eval_main)


def _dg_args(t: argparse.ArgumentParser) -> None:
    """The domain-generalisation protocol's flags (msa_fast.train.dg)."""
    g = t.add_argument_group("domain generalisation (--protocol dg)")
    g.add_argument("--protocol", default="standard", choices=("standard", "dg"),
                   help="standard: train / select / test on one dataset (-d); dg: train on --source, select on the "
                        "sources' validation splits, test once on the unseen --target (-d is then ignored)")
    g.add_argument("--source", default=None, help="dg: source dataset(s), comma separated, e.g. mosi,mosei")
    g.add_argument("--target", default=None, help="dg: the unseen target dataset, e.g. sims")
    g.add_argument("--harmonise", default="projection", choices=("projection", "standardise"),
                   help="dg: feature harmonisation; projection = a fixed, data-independent map per (dataset, "
                        "modality) into a shared space (strict DG; default); standardise = z-score each feature "
                        "with its domain's train inputs first (reads the target's unlabelled inputs)")
    g.add_argument("--shared-dim", type=int, default=64, help="dg: audio / vision dim of the shared space (64)")
    g.add_argument("--report-scale", default="native", choices=("native", "normalised"),
                   help="dg: target metrics in the target's native label scale and metric set (default), or on "
                        "[-1, 1] with the [-1, 1] (SIMS) metric set; training always uses [-1, 1]")
    g.add_argument("--length-scale", type=float, default=None,
                   help="dg with --data synthetic: shrink every synthetic sequence length by this factor in (0, 1] "
                        "(default 1; 0.2 under --smoke)")


def _train_main(args: argparse.Namespace) -> int:
    from .train import main_train

    return main_train(args)


def _eval_main(args: argparse.Namespace) -> int:
    from .train import main_eval

    return main_eval(args)
