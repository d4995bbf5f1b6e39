"""msa-fast bench {ops,retrieval,models,scaling}: micro-benchmarks with ratios against the PyTorch reference.

Each suite lives in its own module (``ops.py``, ``retrieval.py``, ``models.py``) exposing
``add_arguments(parser)`` and ``main(args) -> int`` (rows printed as a table); the same setup factories
are reused by the pytest-benchmark suites in ``benchmarks/``. The suite modules import torch only inside their
functions, so that ``msa-fast bench SUITE --help`` answers at once; the module docstring is the suite's help (first
paragraph) and description (whole, as plain text).
"""
from __future__ import annotations

import argparse
import importlib

SUITES = ("ops", "retrieval", "models", "scaling")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..cli import doc_description, first_paragraph

    p = sub.add_parser("bench", help="run micro-benchmarks (ops | retrieval | models | scaling)",
                       description="Micro-benchmarks of msa_fast against the PyTorch reference: the fused ops "
                                   "(ops), memory-bank search and partner / in-batch retrieval (retrieval), and "
                                   "whole models, forward and training step (models), data-parallel training on 1 vs N processes (scaling). Timings on a shared machine "
                                   "are noisy: compare ratios.")
    suites = p.add_subparsers(dest="suite", metavar="SUITE", title="suites")
    suites.required = True
    for name in SUITES:
        try:
            mod = importlib.import_module(f"msa_fast.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"msa_fast.bench.{name}":
                continue
            raise
        sp = suites.add_parser(name, help=first_paragraph(mod.__doc__, name), description=doc_description(mod.__doc__),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.add_argument("--smoke", action="store_true",
                        help="smallest sizes and one repetition, only to check the suite runs (also MSA_FAST_SMOKE=1)")
        sp.set_defaults(func=_suite_main, suite_module=mod.__name__)


def _suite_main(args: argparse.Namespace) -> int:
    """Run a suite; under ``--smoke`` its module's ``SMOKE`` settings replace the parsed ones first."""
    from ..cli import smoke_requested

    mod = importlib.import_module(args.suite_module)
    if smoke_requested(args):
        for name, value in getattr(mod, "SMOKE", {}).items():
            setattr(args, name, value)
    return mod.main(args)


def format_table(rows: list[dict]) -> str:
    """Plain fixed-width table of dict rows (same keys), for terminals and the README."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
