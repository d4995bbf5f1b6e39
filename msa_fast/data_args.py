"""Argument parsers of ``msa-fast data synth`` and ``msa-fast data inspect``.

Kept free of torch and numpy (importing anything under ``msa_fast.data`` runs the package's ``__init__``, which
imports torch), so that ``msa-fast data --help`` answers at once; the handlers in ``msa_fast.data.cli`` are imported
only when a command actually runs.
"""
from __future__ import annotations

import argparse

#: Same names as ``msa_fast.data.specs.DATASETS`` (checked by tests/test_cli_help.py).
DATASET_NAMES = ("mosei", "mosi", "sims")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthesise or inspect MMSA pickles",
                       description="Synthesise an MMSA-layout pickle with a planted cross-modal signal, or validate "
                                   "an MMSA pickle and summarise it.")
    cmds = p.add_subparsers(dest="data_command", metavar="{synth,inspect}", title="data commands")
    cmds.required = True

    s = cmds.add_parser("synth", help="write a synthetic MMSA pickle (MOSI / MOSEI / SIMS shapes)",
                        description="Write a synthetic dataset in the exact MMSA pickle layout, with the shapes of "
                                    "the chosen dataset and labels that mix a text, an audio and a vision latent "
                                    "(see msa_fast.data.synthetic).")
    s.add_argument("--dataset", default="mosi", choices=DATASET_NAMES, help="shapes to copy (default mosi)")
    s.add_argument("--out", required=True, help="output pickle path")
    s.add_argument("--n-train", type=int, default=None, help="train size (default: the real dataset's)")
    s.add_argument("--n-valid", type=int, default=None, help="valid size (default: the real dataset's)")
    s.add_argument("--n-test", type=int, default=None, help="test size (default: the real dataset's)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--aligned", action="store_true", help="aligned_50 layout (MOSI/MOSEI only)")
    s.add_argument("--smoke", action="store_true",
                   help="32/16/16 samples unless sizes are given, only to check the path (also MSA_FAST_SMOKE=1)")
    s.set_defaults(func=_run_synth)

    i = cmds.add_parser("inspect", help="validate an MMSA pickle and print shapes and statistics",
                        description="Validate an MMSA pickle (keys, shapes, dtypes, lengths, padding, labels) and "
                                    "print per-split shapes, length and label statistics. Exits with status 2 and "
                                    "one error line when the file is not a valid MMSA pickle.")
    i.add_argument("file", help="MMSA pickle (e.g. MOSI/Processed/unaligned_50.pkl)")
    i.add_argument("--splits", default="train,valid,test", help="comma-separated splits (default train,valid,test)")
    i.add_argument("--padding", default="auto", choices=("auto", "right", "left", "ignore"),
                   help="padding check of audio/vision frames beyond *_lengths (default auto: right, or left "
                        "detected and shifted; ignore: no check)")
    i.add_argument("--trust-pickle", action="store_true",
                   help="load with Python's full unpickler (it can run code: only for files you trust); by default "
                        "only arrays, numbers, strings and containers are admitted")
    i.set_defaults(func=_run_inspect)


def _run_synth(args: argparse.Namespace) -> int:
    from .data.cli import run_synth

    return run_synth(args)


def _run_inspect(args: argparse.Namespace) -> int:
    from .data.cli import run_inspect

    return run_inspect(args)
