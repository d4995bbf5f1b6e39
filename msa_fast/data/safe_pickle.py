"""Load MMSA / MAG pickles as data, not code.

``pickle.load`` calls whatever callable a file names (``os.system``, ``builtins.exec``, ...), so opening a downloaded
pickle runs its author's code. ``safe_load`` uses an unpickler whose ``find_class`` admits only the globals that MMSA
processed pickles and MAG-BERT list-of-tuples pickles contain:

- numpy arrays, dtypes and scalars: ``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray._reconstruct`` /
  ``scalar`` and ``numpy.core.numeric._frombuffer`` (protocol 5), under both the numpy 1.x module path
  ``numpy.core.*`` (which real MMSA files, written with numpy 1.x, name) and numpy 2's ``numpy._core.*``; they are
  resolved to the installed numpy's objects directly (no ``numpy.core`` deprecation warning under numpy 2);
- builtin containers and scalars (``set``, ``frozenset``, ``complex``, ``bytearray``, ``bytes``, ... under
  ``builtins`` and Python 2's ``__builtin__``), ``collections.OrderedDict``;
- ``_codecs.encode`` as pickle protocols 0-2 use it for ``bytes`` (only the ``latin1`` codec is accepted).

Object arrays (MMSA's ``raw_text`` / ``id``) unpickle through ``_reconstruct`` + ``ndarray.__setstate__`` with a
list of their elements, which pass through the same ``find_class`` filter. Anything else raises
``UnsafePickleError`` (a ``ValueError``) naming the global; ``trusted=True`` (``--trust-pickle`` on the command line)
uses Python's full unpickler for files you trust.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
from typing import Any, BinaryIO, Callable

import numpy as np

__all__ = ["safe_load", "safe_loads", "UnsafePickleError", "SafeUnpickler", "ALLOWED_GLOBALS"]

_NUMPY2 = int(np.__version__.split(".")[0]) >= 2
_CORE = "numpy._core" if _NUMPY2 else "numpy.core"


class UnsafePickleError(ValueError):
    """The pickle references a global outside the data allowlist (loading it could run code)."""

    def __init__(self, global_name: str, source: str | None = None):
        self.global_name = global_name
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(
            f"{where}refusing to unpickle {global_name!r}: MMSA/MAG pickles hold only numpy arrays and builtin "
            "containers, and loading this global could run code from the file; if you trust the file, pass "
            "trusted=True (load_mmsa(..., trusted=True) / read_mag(..., trusted=True) / safe_load(..., trusted=True)) "
            "or --trust-pickle on the command line")


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` restricted to what pickle protocols 0-2 write for ``bytes``: ``encode(str, 'latin1')``."""
    norm = encoding.lower().replace("-", "").replace("_", "") if isinstance(encoding, str) else None
    if not isinstance(obj, str) or norm not in ("latin1", "iso88591", "l1") or errors != "strict":
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


def _numpy_core(submodule: str, name: str) -> Callable[[], Any]:
    def resolve():
        return getattr(importlib.import_module(f"{_CORE}.{submodule}"), name)
    return resolve


_BUILTIN_NAMES = ("set", "frozenset", "complex", "bytearray", "bytes", "str", "int", "float", "bool", "list",
                  "tuple", "dict", "slice", "range")

#: (module, name) → zero-argument resolver of the object to return. Nothing outside this table is ever imported.
ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
}
for _pkg in ("numpy.core", "numpy._core"):
    ALLOWED_GLOBALS[(f"{_pkg}.multiarray", "_reconstruct")] = _numpy_core("multiarray", "_reconstruct")
    ALLOWED_GLOBALS[(f"{_pkg}.multiarray", "scalar")] = _numpy_core("multiarray", "scalar")
    ALLOWED_GLOBALS[(f"{_pkg}.numeric", "_frombuffer")] = _numpy_core("numeric", "_frombuffer")
for _mod in ("builtins", "__builtin__"):
    for _name in _BUILTIN_NAMES:
        ALLOWED_GLOBALS[(_mod, _name)] = (lambda n=_name: getattr(__import__("builtins"), n))
del _pkg, _mod, _name


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only ``ALLOWED_GLOBALS``."""

    def __init__(self, file: BinaryIO, *, source: str | None = None, **kwargs):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        resolve = ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise UnsafePickleError(f"{module}.{name}", self._source)
        return resolve()


def _source_name(f: Any) -> str | None:
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else None


def safe_load(file_obj_or_path: str | os.PathLike | BinaryIO, trusted: bool = False, **kwargs) -> Any:
    """Unpickle a path or a binary file object, admitting only data globals unless ``trusted``.

    Args:
        file_obj_or_path: a path, or a file object opened in binary mode.
        trusted: use Python's full unpickler (can run code: only for files you trust).
        **kwargs: passed to the unpickler (``encoding="latin1"`` for Python 2 pickles, ...).

    Raises:
        UnsafePickleError (a ValueError): the pickle references a global outside ``ALLOWED_GLOBALS``.
        Other ``pickle`` / OS errors as ``pickle.load`` raises them.
    """
    if isinstance(file_obj_or_path, (str, os.PathLike)):
        with open(file_obj_or_path, "rb") as f:
            return safe_load(f, trusted=trusted, **kwargs)
    if trusted:
        return pickle.Unpickler(file_obj_or_path, **kwargs).load()
    return SafeUnpickler(file_obj_or_path, source=_source_name(file_obj_or_path), **kwargs).load()


def safe_loads(data: bytes | bytearray | memoryview, trusted: bool = False, **kwargs) -> Any:
    """``safe_load`` of an in-memory pickle."""
    return safe_load(io.BytesIO(data), trusted=trusted, **kwargs)
