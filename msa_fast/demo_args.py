"""Argument parser of ``msa-fast demo``.

Kept free of torch and numpy so that ``msa-fast demo --help`` answers at once; ``msa_fast.demo`` (which imports
torch) is imported only when the demo actually runs.
"""
from __future__ import annotations

import argparse

DESCRIPTION = ("A short tour of msa_fast: synthesise a dataset, inspect it, score trivial baselines (constant and "
               "ridge regressions per modality and fused) with the MMSA metrics, benchmark the fused ops against "
               "the eager PyTorch composition, and train a model for a few epochs. Sections whose modules are not "
               "available are skipped with a note.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="one-minute tour: synthetic data, inspection, baselines, op benchmark, training",
                       description=DESCRIPTION)
    p.add_argument("--dataset", default="mosi", choices=("mosi", "mosei", "sims"),
                   help="shapes to copy (default mosi)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller data (256/64/128) for a few-second run")
    size.add_argument("--full", action="store_true", help="the real dataset's split sizes")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)
