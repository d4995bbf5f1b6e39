"""Checkpoint state: seeds and RNG states, atomic writes, reading checkpoints safely, and the configuration diff
that guards ``--resume``."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .._atomic import atomic_torch_save



# ---- small utilities ---------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as MMSA: deterministic cuBLAS
        torch.cuda.manual_seed_all(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray: stored as a tensor so the checkpoint loads with weights_only=True
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` (atomic on POSIX and Windows):
    a crash leaves either the previous file or the new one, never a truncated one."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(obj, path)


def _load(path: str | os.PathLike) -> dict:
    """A checkpoint written by this trainer, read with ``weights_only=True``; anything else (another file type, a
    truncated or foreign ``.pt``) is a ValueError naming the file, never advice to unpickle it unsafely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist" + (" (it is a folder)" if path.is_dir()
                                                                             else ""))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError / UnpicklingError / EOFError / zip errors by case
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in first or "Unsupported global" in first:
            first = "it holds objects other than tensors and plain values"
        raise ValueError(f"{path} is not a readable msa-fast checkpoint (truncated, or not written by "
                         f"msa-fast train): {first[:200]}") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not an msa-fast checkpoint (expected best.pt / last.pt written by "
                         f"msa-fast train, with 'model' and 'config')")
    return state

#: Trainer settings that may differ on resume: how the run is shown or where it runs, not what it computes.
_RESUME_FREE_KEYS = ("resume", "quiet", "device", "checkpoint_dir", "log_file", "save_predictions")


def _dict_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str) -> list[str]:
    """``["key: old → new", ...]`` over the union of keys (absent = ``<unset>``)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        else:
            same = json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
        if not same:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out

def _plain(obj: Any) -> Any:
    """JSON-like copy (tuples → lists, other objects → str) so checkpoints load with ``weights_only=True``."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj
    return str(obj)

