"""Session setup shared by tests/ and benchmarks/ (pytest loads this before either).

Triton decides interpreter vs compiler when a kernel is *decorated* (module import), so TRITON_INTERPRET must be set
before anything imports ``msa_fast.kernels``: it is set here, at the very top, when no CUDA device is available and
the variable is unset. Triton's kernel cache goes to a throw-away directory.
"""
import atexit
import os
import shutil
import tempfile

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
if "TRITON_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="msa_fast_triton_cache_")
    os.environ["TRITON_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
