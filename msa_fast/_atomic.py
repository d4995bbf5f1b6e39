"""One atomic file write for every ``torch.save`` of the package (checkpoints, saved indexes).

The object goes to a temporary file ``.<name>.<random>.tmp`` in the target's folder, is flushed and fsynced, then
``os.replace``-d over the target (atomic on POSIX and Windows): a crash leaves the previous file or the new one, never
a truncated one, and the temporary's name is what ``msa_fast.rundir.clean_stale_temporaries`` recognises.
"""
from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Optional

import torch

#: ``on_error(exc, action) -> Exception``: turns an OSError of step ``action`` into the error the caller raises.
ErrorMapper = Callable[[OSError, str], BaseException]


def atomic_torch_save(obj: Any, path: str | os.PathLike, on_error: Optional[ErrorMapper] = None) -> None:
    path = os.fspath(path)
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        if on_error is None:
            raise
        raise on_error(err, "creating a temporary file next to it") from err
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(err, OSError) and on_error is not None:
            raise on_error(err, "writing") from err
        raise
