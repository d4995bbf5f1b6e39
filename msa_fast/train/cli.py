"""Handlers of ``msa-fast train`` / ``msa-fast eval`` (their parsers: ``msa_fast.train_args``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


from ..metrics import results_row
from ..train_args import SMOKE_SIZES, smoke_requested
from .config import parse_overrides
from .data import _synthetic_sizes, write_predictions
from .run import evaluate_checkpoint, find_checkpoints, run



def main_train(args: argparse.Namespace) -> int:
    config = parse_overrides(args.overrides)
    run(args.model, args.dataset, config_file=args.config, config=config, seeds=args.seeds, data=args.data,
        missing=args.missing, missing_train=args.missing_train, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, device=args.device, out_dir=args.out, key_eval=args.key_eval, early_stop=args.early_stop,
        resume=args.resume, quiet=args.quiet, synthetic_seed=args.synthetic_seed or 0, n_train=args.n_train,
        n_valid=args.n_valid, n_test=args.n_test, select_on=args.select_on, trust_pickle=args.trust_pickle,
        allow_label_range=args.allow_label_range, save_predictions=args.save_predictions,
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

