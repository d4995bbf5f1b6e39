"""``msa-fast data synth|inspect``: write a synthetic MMSA pickle, or validate and summarise one."""
from __future__ import annotations

import argparse
import time

import numpy as np

from .mmsa import load_mmsa
from .specs import DATASETS
from .synthetic import save_mmsa, synthetic


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthesise or inspect MMSA pickles",
                       description="Synthesise an MMSA-layout pickle with a planted signal, or validate one.")
    cmds = p.add_subparsers(dest="data_command", metavar="{synth,inspect}")
    cmds.required = True

    s = cmds.add_parser("synth", help="write a synthetic MMSA pickle (MOSI / MOSEI / SIMS shapes)",
                        description="Write a synthetic dataset in the exact MMSA pickle layout (see "
                                    "msa_fast.data.synthetic for the planted cross-modal signal).")
    s.add_argument("--dataset", default="mosi", choices=sorted(DATASETS), help="shapes to copy (default mosi)")
    s.add_argument("--out", required=True, help="output pickle path")
    s.add_argument("--n-train", type=int, default=None, help="train size (default: the real dataset's)")
    s.add_argument("--n-valid", type=int, default=None, help="valid size (default: the real dataset's)")
    s.add_argument("--n-test", type=int, default=None, help="test size (default: the real dataset's)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--aligned", action="store_true", help="aligned_50 layout (MOSI/MOSEI only)")
    s.set_defaults(func=run_synth)

    i = cmds.add_parser("inspect", help="validate an MMSA pickle and print shapes and statistics",
                        description="Validate an MMSA pickle (keys, shapes, dtypes, lengths, padding, labels) and "
                                    "print per-split shapes, length and label statistics.")
    i.add_argument("file", help="MMSA pickle (e.g. MOSI/Processed/unaligned_50.pkl)")
    i.add_argument("--splits", default="train,valid,test", help="comma-separated splits (default train,valid,test)")
    i.add_argument("--padding", default="auto", choices=("auto", "right", "left", "ignore"),
                   help="padding check of audio/vision frames beyond *_lengths (default auto: right, or left "
                        "detected and shifted; ignore: no check)")
    i.set_defaults(func=run_inspect)


def run_synth(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    data = synthetic(args.dataset, args.n_train, args.n_valid, args.n_test, seed=args.seed, aligned=args.aligned)
    save_mmsa(data, args.out)
    sizes = "/".join(str(len(data[s]["regression_labels"])) for s in ("train", "valid", "test"))
    print(f"wrote {args.out}: synthetic {args.dataset} {'aligned' if args.aligned else 'unaligned'} "
          f"({sizes} samples, seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


def _stats(x: np.ndarray) -> str:
    x = np.asarray(x, dtype=np.float64)
    return f"min {x.min():.3g}  mean {x.mean():.3g}  max {x.max():.3g}"


def describe(data: dict, report: dict) -> list[str]:
    """Lines summarising validated ``data`` (``load_mmsa(..., return_report=True)``)."""
    lines = []
    for split, d in data.items():
        r = report[split]
        lines.append(f"[{split}] {r['n']} samples")
        for key, value in d.items():
            if isinstance(value, np.ndarray) and value.dtype != object:
                lines.append(f"  {key:<22} {str(tuple(value.shape)):<18} {value.dtype}")
            elif isinstance(value, (list, tuple, np.ndarray)):
                lines.append(f"  {key:<22} {f'({len(value)},)':<18} str")
            else:
                lines.append(f"  {key:<22} {type(value).__name__}")
        lines.append(f"  text tokens     {_stats(r['text_lengths'])}")
        for m in ("audio", "vision"):
            lens = d[f"{m}_lengths"]
            full = int((lens == d[m].shape[1]).sum())
            lines.append(f"  {m} frames{'':<{6 - len(m)}}    {_stats(lens)}  full {full}  padding "
                         f"{r[f'{m}_padding']}  non-finite values zeroed {r[f'{m}_nonfinite']}")
        for key in ("regression_labels", "regression_labels_T", "regression_labels_A", "regression_labels_V"):
            if key in d:
                y = d[key]
                lines.append(f"  {key:<22} {_stats(y)}  std {y.std():.3g}  zero {int((y == 0).sum())}  "
                             f">=0 {float((y >= 0).mean()):.3f}")
    return lines


def run_inspect(args: argparse.Namespace) -> int:
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    data, report = load_mmsa(args.file, splits=splits, padding=args.padding, return_report=True)
    print(f"{args.file}: valid MMSA pickle")
    print("\n".join(describe(data, report)))
    return 0
