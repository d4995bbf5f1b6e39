"""Backend selection for the fused ops: ``backend="auto" | "triton" | "cpp" | "torch"``.

"auto" (overridable by env ``MSA_FAST_BACKEND`` or ``with use_backend(name):``):
- CUDA tensors → "triton" when Triton and ``msa_fast.kernels`` import, else "torch".
- CPU tensors  → "cpp" when the extension ``msa_fast._C`` is built, else "torch".
- ``attention(dropout_p > 0)``: the C++ and Triton backends apply dropout inside the kernel (one counter-based RNG,
  mask regenerated in backward, identical masks on both); the torch backend runs the reference with ``F.dropout``.
Single-source CPU attention may additionally be routed to ``torch.nn.functional.scaled_dot_product_attention``
by ``msa_fast.ops.attention`` (see its docstring for the measured rule).
Forcing "triton" on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (tests).

Backend objects expose ``forward`` / ``backward`` per op name ("attention", "bottleneck_exchange", "masked_mean")
following OPS_CONTRACT.md: "torch" → ``msa_fast.ops._torch_backend``, "cpp" → ``msa_fast.ops._cpp_backend``,
"triton" → ``msa_fast.kernels.<op>``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
from typing import Iterator, Optional

import torch

from .. import _ext

BACKENDS = ("auto", "triton", "cpp", "torch")
OPS = ("attention", "bottleneck_exchange", "masked_mean")
_state = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within the block, ``backend="auto"`` means ``name`` (explicit ``backend=`` arguments still win)."""
    _check_name(name, "use_backend(name)")
    prev = getattr(_state, "override", None)
    _state.override = name
    try:
        yield
    finally:
        _state.override = prev


def _check_name(name: str, what: str = "backend") -> None:
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")


def _override() -> Optional[str]:
    name = getattr(_state, "override", None)
    if name is None:
        name = os.environ.get("MSA_FAST_BACKEND") or None
        if name is not None:
            _check_name(name, "env MSA_FAST_BACKEND")
    return None if name == "auto" else name


def _triton_importable() -> bool:
    if not _ext.triton_available():
        return False
    try:
        importlib.import_module("msa_fast.kernels.attention")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def resolve(backend: str, device: torch.device) -> str:
    """Concrete backend name for tensors on ``device`` ("triton" | "cpp" | "torch")."""
    _check_name(backend)
    if backend == "auto":
        backend = _override() or "auto"
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if _triton_importable() else "torch"
        if device.type == "cpu" and _ext.cpp_available():
            return "cpp"
        return "torch"
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, got device {device}")
        if not _ext.cpp_available():
            raise RuntimeError("backend='cpp' requested but the C++ extension msa_fast._C is not built "
                               "(pip install --no-build-isolation -e .)")
    if backend == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}")
        if not _triton_importable():
            raise RuntimeError("backend='triton' requested but triton / msa_fast.kernels is not importable here")
    return backend


def get(op: str, name: str):
    """The object with ``forward``/``backward`` of ``op`` for the concrete backend ``name``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    if name == "torch":
        from . import _torch_backend as mod
        return getattr(mod, op)
    if name == "cpp":
        from . import _cpp_backend as mod
        return getattr(mod, op)
    if name == "triton":
        return importlib.import_module(f"msa_fast.kernels.{op}")
    raise ValueError(f"no concrete backend {name!r}")
