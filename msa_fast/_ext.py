"""Optional compiled / GPU components, imported lazily and reported once.

``cpp_extension()`` returns the compiled ``msa_fast._C`` module or ``None``; ``triton_available()`` says whether
Triton kernels can run on CUDA tensors here. Missing pieces never break ``import msa_fast``: every op falls back
to the PyTorch reference, and a single warning says which backend is missing.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType


@functools.lru_cache(maxsize=None)
def cpp_extension() -> ModuleType | None:
    """The compiled C++/OpenMP extension, or None (with one warning) if it is not built."""
    if os.environ.get("MSA_FAST_DISABLE_CPP", "0") == "1":
        return None
    try:
        return importlib.import_module("msa_fast._C")
    except ImportError as err:
        warnings.warn(
            f"msa_fast: the C++ extension msa_fast._C is not available ({err}); CPU ops use the PyTorch "
            "reference backend. Rebuild with `pip install --no-build-isolation -e .` to get it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def cpp_available() -> bool:
    return cpp_extension() is not None


@functools.lru_cache(maxsize=None)
def triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def triton_available() -> bool:
    """True when Triton is importable and a CUDA device exists (or the interpreter is on, for tests)."""
    if triton_module() is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    import torch

    return torch.cuda.is_available()
