"""The ``msa-fast`` command line: ``data synth|inspect``, ``demo``, ``bench``, ``train``, ``eval``.

Each sub-command lives with the code it drives (``msa_fast.data.cli``, ``msa_fast.bench``, ``msa_fast.train``,
``msa_fast.demo``) and registers itself through ``add_parser(subparsers)``; the modules are imported lazily so
``msa-fast --help`` stays fast and a missing optional dependency only affects its own command.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (command name, module that defines add_parser(subparsers))
COMMANDS = [
    ("data", "msa_fast.data.cli"),
    ("demo", "msa_fast.demo"),
    ("bench", "msa_fast.bench"),
    ("train", "msa_fast.train"),
    ("eval", "msa_fast.train"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msa-fast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    seen = set()
    for _name, module in COMMANDS:
        if module in seen:
            continue
        seen.add(module)
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # the module is not written yet or misses an optional dependency
            if err.name and err.name.startswith("msa_fast"):
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as err:
        # Bad input gets one clear line, not a traceback (set MSA_FAST_DEBUG=1 for the traceback).
        import os

        if os.environ.get("MSA_FAST_DEBUG") == "1":
            raise
        print(f"msa-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
