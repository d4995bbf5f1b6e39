"""Triton GPU kernels (installed as ``msa_fast.kernels``): the "triton" backend of the fused ops.

Each public module (``attention``, ``bottleneck_exchange``, ``masked_mean``, ...) exposes host launchers named
``forward`` / ``backward`` following the backend contract (helper_notes/OPS_CONTRACT.md) and an ``AOT_CONFIGS``
list describing every kernel configuration its launchers can pick, so ``tests/test_aot.py`` can compile each one for
sm_80 / sm_90 without a GPU and check spills and shared memory.

Configs are hand-picked per head dim (FlagAttention style), never autotuned: autotuning needs a GPU driver, and the
kernels must also run under ``TRITON_INTERPRET=1`` on CPU tensors for the tests.

Small shared helpers live here (no triton import, so importing the package stays cheap).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import torch

# torch dtype -> Triton pointer element type used in AOT signatures.
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                torch.int32: "i32"}

# Head dims are padded inside the kernels to a power of two >= 16 (tl.dot needs every dim >= 16 on GPU).
MAX_HEAD_DIM = 128  # D > 64 uses 32-wide tiles (see each kernel's _config) to stay spill-free on sm_80/sm_90


def block_d(d: int) -> int:
    """Padded head-dim block: next power of two >= max(d, 16). Raises ValueError above MAX_HEAD_DIM."""
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] for the triton backend, got {d}")
    return max(16, 1 << (d - 1).bit_length())


def make_signature(fn: Callable, types: Mapping[str, str], constexprs: Mapping[str, Any],
                   default: str = "i32") -> dict[str, str]:
    """AOT signature for a ``@triton.jit`` function: every parameter, in order.

    ``types`` maps pointer / float parameters to Triton types ("*fp16", "fp32"); constexpr parameters get
    "constexpr"; everything else (lengths, strides) gets ``default``.
    """
    raw = getattr(fn, "fn", fn)  # JITFunction / InterpretedFunction keep the Python function in .fn
    sig = {}
    for name in inspect.signature(raw).parameters:
        sig[name] = "constexpr" if name in constexprs else types.get(name, default)
    unknown = set(types) - set(sig)
    if unknown:
        raise ValueError(f"types names parameters {sorted(unknown)} that {raw.__name__} does not have")
    return sig


def as_u8(mask: torch.Tensor) -> torch.Tensor:
    """bool mask -> uint8 view (zero copy) so kernels load it as bytes."""
    if mask.dtype != torch.bool:
        raise TypeError(f"expected a bool mask, got {mask.dtype}")
    return mask.contiguous().view(torch.uint8)


_OFFSETS_CACHE: dict[tuple, torch.Tensor] = {}


def offsets_tensor(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 device copy of segment offsets, cached so repeated calls do not re-upload."""
    key = (tuple(int(o) for o in offsets), str(device))
    t = _OFFSETS_CACHE.get(key)
    if t is None:
        if len(_OFFSETS_CACHE) > 256:
            _OFFSETS_CACHE.clear()
        t = torch.tensor(key[0], dtype=torch.int32, device=device)
        _OFFSETS_CACHE[key] = t
    return t


def check_offsets(offsets, total: int, name: str) -> tuple[int, ...]:
    """Validate segment offsets: python ints, start at 0, non-decreasing, end at ``total``."""
    offs = tuple(int(o) for o in offsets)
    if len(offs) < 2 or offs[0] != 0 or offs[-1] != total or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"{name} must be non-decreasing ints from 0 to {total}, got {offs}")
    return offs


def num_segment_blocks(offsets: tuple[int, ...], block: int) -> int:
    """Number of row blocks when every segment is tiled separately (blocks never straddle segments)."""
    return sum(-(-(b - a) // block) for a, b in zip(offsets, offsets[1:]))
