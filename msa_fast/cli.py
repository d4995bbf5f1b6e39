"""The msa-fast command line: data synth|inspect, demo, bench ops|retrieval|models, train, eval, models.

Each command registers itself through ``add_parser(subparsers)`` of the module named in ``COMMANDS``. Those modules
must import without torch or numpy (handlers import the heavy code when a command actually runs), so that
``msa-fast --help`` and every ``msa-fast COMMAND --help`` answer at once; a module that is missing (not written
yet, or missing an optional msa_fast piece) only removes its own command.

Help text style: every sub-command has ``help=`` (one line, lowercase, shown in the parent's list) and
``description=`` (full sentences, shown by its own --help); every option has ``help=``; no reStructuredText
markup (double backticks) in any of them: pass docstrings through ``plain_text`` / ``doc_description`` first.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import sys
import textwrap

# (command name, module that defines add_parser(subparsers)); a module is imported once even if listed twice.
COMMANDS = [
    ("data", "msa_fast.data_args"),
    ("demo", "msa_fast.demo_args"),
    ("bench", "msa_fast.bench"),
    ("train", "msa_fast.train_args"),
    ("eval", "msa_fast.train_args"),
    ("models", "msa_fast.models_cli"),
]

DESCRIPTION = ("Fused kernels and drop-in PyTorch models for multimodal sentiment analysis: synthesise or inspect "
               "MMSA data, run the demo, benchmark ops / retrieval / models, train and evaluate registered models, "
               "list models and datasets. Run 'msa-fast COMMAND --help' for a command's options.")

_LITERAL = re.compile(r"``(.+?)``")
_ROLE = re.compile(r":[a-z]+:`(.+?)`")
_STRONG = re.compile(r"\*\*(.+?)\*\*")


def plain_text(text: str) -> str:
    """``text`` (a docstring, say) without reStructuredText inline markup: ``x`` → x, :func:`x` → x, **x** → x, a
    trailing ``::`` → ``:``. Terminal help must not show double backticks."""
    text = _LITERAL.sub(r"\1", text)
    text = _ROLE.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = re.sub(r"::$", ":", text, flags=re.MULTILINE)
    return text.replace("``", "")


def first_paragraph(doc: str | None, default: str = "") -> str:
    """The first paragraph of ``doc`` on one line, as plain text (for ``help=`` of a sub-command)."""
    doc = textwrap.dedent(doc or "").strip()
    if not doc:
        return default
    return plain_text(" ".join(line.strip() for line in doc.split("\n\n")[0].splitlines()))


def doc_description(doc: str | None, width: int | None = None) -> str:
    """``doc`` as plain text wrapped for the terminal, paragraphs and "- " list items kept (for ``description=``
    with ``formatter_class=argparse.RawDescriptionHelpFormatter``)."""
    if width is None:
        width = max(40, min(100, shutil.get_terminal_size().columns - 2))
    lines = textwrap.dedent(plain_text(doc or "")).strip().splitlines()
    # docstrings indent only their first line differently: dedent the rest on their own
    if len(lines) > 1:
        lines = [lines[0]] + textwrap.dedent("\n".join(lines[1:])).splitlines()
    out: list[str] = []
    item: list[str] = []

    def flush() -> None:
        if item:
            bullet = item[0].startswith("- ")
            out.append(textwrap.fill(" ".join(s.strip() for s in item), width,
                                     subsequent_indent="  " if bullet else ""))
            item.clear()

    for line in lines:
        if not line.strip():
            flush()
            out.append("")
        elif line.startswith("    "):  # a literal (code) block line: kept as is
            flush()
            out.append(line.rstrip())
        elif line.startswith("- "):  # a list item starts; its continuation lines are indented less than 4
            flush()
            item.append(line)
        else:
            item.append(line)
    flush()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def smoke_requested(args: argparse.Namespace) -> bool:
    """``--smoke`` given, or MSA_FAST_SMOKE=1 in the environment: run a command at its smallest sizes, only to check
    that the path works (tests/test_readme.py runs every README command this way)."""
    import os

    return bool(getattr(args, "smoke", False)) or os.environ.get("MSA_FAST_SMOKE") == "1"


def build_parser() -> argparse.ArgumentParser:
    """The msa-fast parser, built without importing torch (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="msa-fast", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    seen = set()
    for _name, module in COMMANDS:
        if module in seen:
            continue
        seen.add(module)
        try:
            mod = importlib.import_module(module)
        except ImportError as err:  # the module is not written yet or misses an optional msa_fast piece
            if err.name and (err.name == module or err.name.startswith("msa_fast")):
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (msa-fast train --nproc relaunches it)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (msa-fast models | head): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except (ValueError, FileNotFoundError, KeyError, TypeError, RuntimeError) as err:
        # Bad input gets one clear line, not a traceback (set MSA_FAST_DEBUG=1 for the traceback).
        import os

        if os.environ.get("MSA_FAST_DEBUG") == "1":
            raise
        print(f"msa-fast {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
