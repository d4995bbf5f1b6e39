"""A training run's output folder: checked before any work, owned by one run at a time, with a log file.

- ``check_output_dir`` refuses a path that is a file or a folder this process cannot write, before data is loaded.
- ``RunLock`` holds ``<out>/.msa_fast.lock`` for the run's lifetime: an exclusive ``fcntl.flock`` (released by the
  kernel when the process dies, even by ``kill -9``, so there are no stale locks) on a file that names the holder.
  A second run into the same folder is refused with that name instead of mixing two runs' checkpoints and results.
- ``clean_stale_temporaries`` removes the ``.*.tmp`` files an interrupted ``atomic_save`` left behind; it is only
  called while the lock is held, so it never touches a live run's temporary.
- ``RunLog`` prints (unless quiet) and appends every line to ``<out>/logs/<run>.log`` with a timestamp.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

try:  # POSIX; elsewhere the lock degrades to an exclusive-create file
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

LOCK_NAME = ".msa_fast.lock"


class OutputDirInUse(ValueError):
    """Another live run holds the output folder."""


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed; ValueError naming it if it is a file or not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a folder: choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"--out {path} is not writable ({err.strerror or err}): choose another --out") from None
    return path


class RunLock:
    """Exclusive ownership of an output folder for one run (context manager)."""

    def __init__(self, out_dir: str | os.PathLike, command: Optional[str] = None):
        self.path = Path(out_dir) / LOCK_NAME
        self.command = command if command is not None else " ".join(sys.argv)
        self._fd: Optional[int] = None

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "an unknown process"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
        return (f"pid {info.get('pid')} on {info.get('host')} since {started} "
                f"({info.get('command') or 'no command recorded'})")

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputDirInUse(f"output folder {self.path.parent} is in use by another run: {self.holder()}; "
                                     f"wait for it to finish or choose another --out") from None
        else:  # pragma: no cover - Windows
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise OutputDirInUse(f"output folder {self.path.parent} is in use by another run: {self.holder()} "
                                     f"(delete {self.path} if that process is gone)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": self.command}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
            if fcntl is None:  # pragma: no cover - Windows
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.<random>.tmp`` files (``atomic_save``'s temporaries) under ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in folder.rglob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()
            removed.append(tmp)
    return removed


class RunLog:
    """``say(line)``: print unless quiet; always append to the log file with a timestamp."""

    def __init__(self, path: Optional[str | os.PathLike], quiet: bool = False):
        self.path = Path(path) if path is not None else None
        self.quiet = quiet
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, line: str) -> None:
        if self.path is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with open(self.path, "a") as f:
                for part in str(line).splitlines() or [""]:
                    f.write(f"{stamp} {part}\n")

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, flush=True)
        self.write(line)
