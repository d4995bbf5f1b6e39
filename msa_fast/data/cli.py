"""``msa-fast data synth|inspect``: write a synthetic MMSA pickle, or validate and summarise one.

The handlers (``run_synth``, ``run_inspect``) live here; the argument parsers live in ``msa_fast.data_args``, which
imports without torch.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .mmsa import load_mmsa
from .synthetic import save_mmsa, synthetic


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``msa-fast data``; the parsers live in the torch-free ``msa_fast.data_args`` (what ``msa_fast.cli``
    uses, since importing this module imports torch through the ``msa_fast.data`` package)."""
    from ..data_args import add_parser as _add_parser

    _add_parser(sub)


def run_synth(args: argparse.Namespace) -> int:
    import os

    from ..cli import smoke_requested

    start = time.perf_counter()
    n = [args.n_train, args.n_valid, args.n_test]
    if smoke_requested(args):
        n = [v if v is not None else d for v, d in zip(n, (32, 16, 16))]
    data = synthetic(args.dataset, *n, seed=args.seed, aligned=args.aligned)
    nbytes = sum(np.asarray(v).nbytes for split in data.values() for v in split.values()
                 if np.asarray(v).dtype != object)
    print(f"writing {args.out}: about {nbytes / 2**20:.0f} MiB (use --n-train/--n-valid/--n-test for a smaller "
          f"file)" if nbytes > 64 * 2**20 else f"writing {args.out}: about {nbytes / 2**20:.1f} MiB", flush=True)
    save_mmsa(data, args.out)
    sizes = "/".join(str(len(data[s]["regression_labels"])) for s in ("train", "valid", "test"))
    print(f"wrote {args.out}: synthetic {args.dataset} {'aligned' if args.aligned else 'unaligned'} "
          f"({sizes} samples, seed {args.seed}, {os.path.getsize(args.out) / 2**20:.1f} MiB) in "
          f"{time.perf_counter() - start:.1f} s")
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
    data, report = load_mmsa(args.file, splits=splits, padding=args.padding, return_report=True,
                             trusted=getattr(args, "trust_pickle", False))
    print(f"{args.file}: valid MMSA pickle")
    print("\n".join(describe(data, report)))
    return 0
