"""The README's commands work as written: every ``msa-fast`` line of its ``bash`` blocks runs, in order, in one
folder (later commands read what earlier ones wrote), at smoke sizes (MSA_FAST_SMOKE=1: the same commands with the
smallest model, data and repeat counts), and the Python quick tour runs as printed."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """``msa-fast ...`` lines of the bash blocks (continuations joined, trailing comments dropped); the set-up
    commands contribute the part after their last ``&& msa-fast``; the test command (pytest) is not run here."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if "&& msa-fast " in line:
                line = "msa-fast " + line.rsplit("&& msa-fast ", 1)[1]
            if line.startswith("msa-fast"):
                commands.append(line)
    return commands


def _env() -> dict:
    return {**os.environ, "MSA_FAST_SMOKE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def test_readme_lists_the_main_commands():
    commands = readme_commands()
    firsts = {shlex.split(c)[1] for c in commands}
    assert {"demo", "data", "train", "eval", "bench", "models"} <= firsts, firsts


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    for command in readme_commands():
        argv = [sys.executable, "-m", "msa_fast", *shlex.split(command)[1:]]
        proc = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README command failed: {command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_readme_python_tour_runs(tmp_path):
    (code,) = [b for b in _blocks("python") if "quick tour" in b.lower() or "import msa_fast" in b][:1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
