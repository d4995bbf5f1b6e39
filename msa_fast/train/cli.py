"""Handlers of ``msa-fast train`` / ``msa-fast eval`` (their parsers: ``msa_fast.train_args``)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..metrics import results_row
from ..train_args import SMOKE_EPOCHS, SMOKE_SIZES, smoke_requested
from .config import parse_overrides
from .data import _synthetic_sizes, write_predictions
from .dist import leave_process_group
from .run import evaluate_checkpoint, find_checkpoints, run



def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_with_torchrun(args: argparse.Namespace) -> int:
    """``msa-fast train --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m msa_fast train ...``: torch's
    own launcher starts the ranks (each joins the group through the environment it sets)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as torchrun

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    try:
        torchrun(parse_args(["--standalone", "--nproc-per-node", str(args.nproc), "-m", "msa_fast",
                             *_without_nproc(args.argv)]))
    except ChildFailedError as err:  # each rank printed its own one-line error; torchrun stopped the others
        raise RuntimeError(f"{len(err.failures)} of {args.nproc} ranks failed (their errors are printed above)") \
            from None
    return 0


def main_train(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return launch_with_torchrun(args)
    config = parse_overrides(args.overrides)
    if os.environ.get("MSA_FAST_SMOKE") == "1" and not args.smoke and args.epochs is not None:
        # the environment asks every command to only check its path (tests/test_readme.py): say what it drops
        print(f"MSA_FAST_SMOKE=1: --epochs {args.epochs} → {SMOKE_EPOCHS} (path check only)", file=sys.stderr)
        args.epochs = None
    if getattr(args, "cross_sample", None):
        config["cross_sample"] = args.cross_sample
    if getattr(args, "protocol", "standard") == "dg" or getattr(args, "source", None) or getattr(args, "target", None):
        return _main_train_dg(args, config)
    completed = False
    try:
        run(args.model, args.dataset, config_file=args.config, config=config, seeds=args.seeds, data=args.data,
            missing=args.missing, missing_train=args.missing_train, epochs=args.epochs, batch_size=args.batch_size,
            lr=args.lr, device=args.device, out_dir=args.out, key_eval=args.key_eval, early_stop=args.early_stop,
            resume=args.resume, quiet=args.quiet, synthetic_seed=args.synthetic_seed or 0, n_train=args.n_train,
            n_valid=args.n_valid, n_test=args.n_test, select_on=args.select_on, trust_pickle=args.trust_pickle,
            allow_label_range=args.allow_label_range, save_predictions=args.save_predictions,
            smoke=smoke_requested(args))
        completed = True
    finally:
        leave_process_group(completed)
    return 0


def _main_train_dg(args: argparse.Namespace, config: dict) -> int:
    """``msa-fast train --protocol dg``: msa_fast.train.dg.run_dg."""
    from .dg import run_dg

    if args.protocol != "dg":
        raise ValueError("--source / --target belong to the domain-generalisation protocol: add --protocol dg")
    for flag, value in (("--missing", args.missing), ("--missing-train", args.missing_train),
                        ("--save-predictions", args.save_predictions or None),
                        ("--select-on test_per_metric", None if args.select_on == "valid" else args.select_on)):
        if value is not None:
            raise ValueError(f"{flag} is not available with --protocol dg")
    run_dg(args.model, args.source, args.target, data=args.data, config_file=args.config, config=config,
           seeds=args.seeds, harmonise=args.harmonise, shared_dim=args.shared_dim, report_scale=args.report_scale,
           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=args.device, out_dir=args.out,
           key_eval=args.key_eval, early_stop=args.early_stop, resume=args.resume, quiet=args.quiet,
           synthetic_seed=args.synthetic_seed or 0, n_train=args.n_train, n_valid=args.n_valid, n_test=args.n_test,
           length_scale=args.length_scale, trust_pickle=args.trust_pickle, allow_label_range=args.allow_label_range,
           smoke=smoke_requested(args))
    return 0


def main_eval(args: argparse.Namespace) -> int:
    target = Path(args.checkpoint)
    paths = find_checkpoints(target, args.model, args.dataset) if target.is_dir() else [target]
    sizes = {"n_train": args.n_train, "n_valid": args.n_valid, "n_test": args.n_test}
    if smoke_requested(args) and args.data == "synthetic":
        sizes = _synthetic_sizes(sizes, SMOKE_SIZES)
    per_ckpt = []
    for i, path in enumerate(paths):
        results = evaluate_checkpoint(path, data=args.data, dataset_name=args.dataset, model_name=args.model,
                                      missing=args.missing, split=args.split, batch_size=args.batch_size,
                                      device=args.device, missing_seed=args.missing_seed,
                                      trusted=args.trust_pickle, allow_label_range=args.allow_label_range,
                                      return_predictions=bool(args.save_predictions), seed=args.synthetic_seed,
                                      **sizes)
        if args.save_predictions:
            write_predictions(args.save_predictions, results.pop("dataset"), results.pop("predictions"),
                              checkpoint=str(path), append=i > 0)
        print(json.dumps({"checkpoint": str(path), "split": args.split, "missing": args.missing, "metrics": results}))
        per_ckpt.append({k: v for k, v in results.items() if k != "Loss"})
    if len(paths) > 1:
        row = results_row(per_ckpt)
        print(json.dumps({"checkpoints": len(paths), "split": args.split,
                          "row (mean*100, std*100)": {k: list(v) for k, v in row.items()}}))
    return 0

