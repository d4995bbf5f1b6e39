"""``msa-fast --help`` and every sub-command's ``--help``: fast (no torch import), described, plain text.

The real guarantee is that building the parser imports neither torch nor numpy (``import torch`` alone costs
seconds); the wall-clock check is kept at a generous 1 s, measured inside the child around the parse only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from msa_fast.cli import build_parser, doc_description, first_paragraph, main, plain_text

_HAS_TRAIN_ARGS = (Path(__file__).resolve().parents[1] / "msa_fast" / "train_args.py").exists()
_NO_TRAIN_ARGS = pytest.mark.skipif(not _HAS_TRAIN_ARGS,
                                    reason="msa_fast/train_args.py (torch-free train/eval parsers) not written yet")

#: Every command path; test_every_command_is_covered keeps this list in step with the parser.
COMMAND_PATHS = [
    (),
    ("data",),
    ("data", "synth"),
    ("data", "inspect"),
    ("demo",),
    ("bench",),
    ("bench", "ops"),
    ("bench", "retrieval"),
    ("bench", "models"),
    ("bench", "scaling"),
    ("bench", "official"),
    pytest.param(("train",), marks=_NO_TRAIN_ARGS),
    pytest.param(("eval",), marks=_NO_TRAIN_ARGS),
    ("models",),
]

HELP_LIMIT_S = 1.0

# Runs in a fresh interpreter: time building the parser and printing one --help, report what got imported.
_CHILD = """
import contextlib, io, json, sys, time
start = time.perf_counter()
from msa_fast.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        main(sys.argv[1:] + ["--help"])
        code = None
    except SystemExit as exc:
        code = exc.code
elapsed = time.perf_counter() - start
print(json.dumps({"code": code, "elapsed": elapsed, "out": buf.getvalue(),
                  "heavy": sorted(m for m in ("torch", "numpy") if m in sys.modules)}))
"""


def _run_child(code: str, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="100")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of ``parser`` and every nested sub-command parser."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))


def _path_id(path: tuple[str, ...]) -> str:
    return " ".join(path) or "msa-fast"


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: _path_id(p))
def test_help_is_fast_torch_free_and_plain(path):
    proc = _run_child(_CHILD, *path)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["code"] == 0, proc.stderr
    assert res["heavy"] == [], f"'msa-fast {_path_id(path)} --help' imported {res['heavy']}"
    assert res["elapsed"] < HELP_LIMIT_S, f"'{_path_id(path)} --help' took {res['elapsed']:.2f} s"
    out = res["out"]
    assert out.startswith("usage: msa-fast"), out[:200]
    assert "``" not in out
    assert "options:" in out


def test_build_parser_imports_no_torch():
    code = ("import sys; from msa_fast.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))")
    proc = _run_child(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_command_is_covered():
    """The timing test above covers every sub-command the parser has (update COMMAND_PATHS with new ones)."""
    listed = {p.values[0] if hasattr(p, "values") else p for p in COMMAND_PATHS}
    found = {path for path, _ in _walk(build_parser())}
    assert found <= listed, f"add to COMMAND_PATHS: {sorted(found - listed)}"
    expected = listed if _HAS_TRAIN_ARGS else listed - {("train",), ("eval",)}
    assert expected <= found, f"commands missing from the parser: {sorted(expected - found)}"


def test_every_command_and_option_has_help():
    for path, parser in _walk(build_parser()):
        name = _path_id(path)
        assert (parser.description or "").strip(), f"'{name}' has no description"
        text = parser.format_help()
        assert "``" not in text, f"'{name} --help' shows reStructuredText double backticks"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert (choice.help or "").strip(), f"'{name} {choice.dest}' has no help line"
                    assert "``" not in choice.help
                continue
            label = "/".join(action.option_strings) or action.dest
            assert action.help and action.help is not argparse.SUPPRESS and action.help.strip(), \
                f"option {label} of '{name}' has no help"


def test_models_command_lists_models_and_datasets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out
    lines = out.splitlines()
    for model in ("dashfusion", "lnln", "hme"):
        row = [i for i, line in enumerate(lines) if line.split()[:1] == [model]]
        assert row, f"{model} not listed:\n{out}"
        assert len(lines[row[0]].split()) > 2, "no description"
        assert lines[row[0] + 1].strip().startswith("datasets: mosi, mosei")
    for dataset, audio_dim, vision_dim in (("mosi", 5, 20), ("mosei", 74, 35), ("sims", 33, 709)):
        row = [line for line in lines if line.split()[:1] == [dataset]]
        assert len(row) == 1, f"{dataset} not listed:\n{out}"
        assert f"audio {audio_dim} x" in row[0] and f"vision {vision_dim} x" in row[0] and "text 768" in row[0]


def test_models_datasets_follow_configs():
    from msa_fast.models_cli import model_datasets

    class Some:
        CONFIGS = {"common": {}, "sims": {}, "mosi": {}}

    class Any_:
        pass

    assert model_datasets(Some, ("mosi", "mosei", "sims")) == ["mosi", "sims"]
    assert model_datasets(Any_, ("mosi", "mosei", "sims")) == ["mosi", "mosei", "sims"]


@pytest.mark.parametrize("argv, bad, valid", [
    (["bench", "models", "--models", "foo"], "foo", ("dashfusion", "lnln", "hme")),
    (["bench", "models", "--models", "hme", "nope"], "nope", ("dashfusion", "lnln", "hme")),
    (["bench", "ops", "--op", "foo"], "foo", ("attention", "bottleneck")),
    (["bench", "retrieval", "--skip", "foo"], "foo", ("bank", "partners", "in_batch")),
])
def test_bench_rejects_unknown_names(capsys, argv, bad, valid):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"msa-fast {' '.join(argv[:2])}: error:"), err
    assert repr(bad) in err[-1] and all(v in err[-1] for v in valid), err[-1]


def test_bench_models_unknown_model_exit_status_from_the_shell():
    proc = subprocess.run([sys.executable, "-m", "msa_fast", "bench", "models", "--models", "foo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "'foo'" in proc.stderr and "dashfusion" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_parser_dataset_names_match_specs():
    from msa_fast.data.specs import DATASETS
    from msa_fast.data_args import DATASET_NAMES

    assert tuple(sorted(DATASETS)) == DATASET_NAMES


def test_legacy_add_parser_entry_points_still_work():
    """msa_fast.data.cli.add_parser and msa_fast.demo.add_parser delegate to the torch-free parsers."""
    from msa_fast import demo
    from msa_fast.data import cli as data_cli

    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="command")
    data_cli.add_parser(sub)
    demo.add_parser(sub)
    args = parser.parse_args(["data", "synth", "--out", "f.pkl", "--dataset", "sims"])
    assert args.dataset == "sims" and callable(args.func)
    assert parser.parse_args(["demo", "--quick"]).quick


def test_plain_text_helpers():
    doc = """``msa-fast x``: does :func:`y` with **z**::

        code line

    - ``a``: first item
      continued
    - b
    """
    assert plain_text(doc).count("``") == 0
    assert first_paragraph(doc) == "msa-fast x: does y with z:"
    text = doc_description(doc, width=40)
    assert "``" not in text and "**" not in text
    assert "    code line" in text
    assert "- a: first item continued" in text and "\n- b" in text
