"""Testing helpers shared by every backend's tests: PyTorch references (``reference``) and the error rule.

The error rule (FlagAttention / flash-attention): a backend's error against the fp64 reference may be at most twice
the error of the same-dtype PyTorch reference against fp64, plus a small absolute floor for the dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import reference  # noqa: F401  (re-exported: msa_fast.testing.reference)

#: absolute error floor per dtype added to the 2x bound (covers reductions whose torch error happens to be ~0)
ATOL_FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_to_reference(out: Tensor, ref64: Tensor, torch_same_dtype_out: Tensor, name: str = "output",
                              atol: Optional[float] = None) -> None:
    """Assert ``max|out − ref64| ≤ 2·max|torch_same_dtype_out − ref64| + atol`` and that ``out`` has no NaN.

    out: the backend's result (any float dtype); ref64: the reference computed in float64; torch_same_dtype_out:
    the PyTorch reference computed in ``out``'s dtype. ``atol`` defaults to ``ATOL_FLOOR[out.dtype]``.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference shape {tuple(ref64.shape)}")
    if out.numel() == 0:
        return
    atol = ATOL_FLOOR.get(out.dtype, 1e-5) if atol is None else atol
    got = out.detach().double().cpu()
    ref = ref64.detach().double().cpu()
    if torch.isnan(got).any():
        raise AssertionError(f"{name}: NaN in backend output ({int(torch.isnan(got).sum())} elements)")
    err = (got - ref).abs().max().item()
    err_torch = (torch_same_dtype_out.detach().double().cpu() - ref).abs().max().item()
    bound = 2.0 * err_torch + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3e} vs fp64 reference exceeds 2 x same-dtype torch error "
                             f"{err_torch:.3e} + atol {atol:g} = {bound:.3e}")


def available_backends(include_triton: bool = True) -> list[str]:
    """Concrete backends usable on CPU tensors in this process ("torch" always; "cpp" when built; "triton" when
    ``msa_fast.kernels`` imports and Triton can run here — CUDA or TRITON_INTERPRET=1)."""
    from .. import _ext

    names = ["torch"]
    if _ext.cpp_available():
        names.append("cpp")
    if include_triton and _ext.triton_available():
        try:
            import msa_fast.kernels.attention  # noqa: F401
            names.append("triton")
        except Exception:  # noqa: BLE001 - not importable here: simply not offered
            pass
    return names


def random_padding_mask(batch: int, length: int, generator: Optional[torch.Generator] = None,
                        empty_row: bool = True) -> Tensor:
    """(batch, length) bool, True = padding, random valid prefix lengths in 0..length; with ``empty_row`` the first
    row is fully padded (the fully-masked case every backend must turn into zeros, not NaN)."""
    lengths = torch.randint(0, length + 1, (batch,), generator=generator)
    if empty_row and batch > 0:
        lengths[0] = 0
    return torch.arange(length)[None, :] >= lengths[:, None]


def strided_like(t: Tensor) -> Tensor:
    """A non-contiguous copy of a (B, H, L, D) tensor: stored as (B, L, H, D) and viewed back (unit stride on D)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def forward_backward_triplet(run, ref, inputs64: Sequence[Tensor], dtype: torch.dtype, noncontig: bool = False):
    """``((out_ref64, out_ref_dtype, out_backend), (grads_ref64, grads_ref_dtype, grads_backend))``: the reference
    in float64 and in ``dtype`` and the backend in ``dtype`` on the same inputs (leaves requiring grad; 4-D inputs
    made non-contiguous with ``strided_like`` when ``noncontig``), gradients from one shared random cotangent per
    output (``None`` where an input gets none). Outputs are lists."""
    def leaves(d):
        out = []
        for t in inputs64:
            x = t.detach().to(d)
            if noncontig and x.dim() == 4 and d != torch.float64:
                x = strided_like(x)
            out.append(x.requires_grad_(True))
        return out

    def as_list(o):
        return list(o) if isinstance(o, (list, tuple)) else [o]

    x64, xd, xb = leaves(torch.float64), leaves(dtype), leaves(dtype)
    o64, od, ob = as_list(ref(*x64)), as_list(ref(*xd)), as_list(run(*xb))
    cot = [torch.randn_like(o) for o in o64]
    g64 = torch.autograd.grad(o64, x64, cot, allow_unused=True)
    gd = torch.autograd.grad(od, xd, [c.to(dtype) for c in cot], allow_unused=True)
    gb = torch.autograd.grad(ob, xb, [c.to(dtype) for c in cot], allow_unused=True)
    return (o64, od, ob), (g64, gd, gb)


def compare_with_reference(run, ref, inputs64: Sequence[Tensor], dtype: torch.dtype, name: str = "op",
                           noncontig: bool = False) -> None:
    """Check a backend against the fp64 reference with the error rule, for outputs and input gradients.

    run(*inputs) and ref(*inputs) return a tensor or a list of tensors; inputs64 are float64 tensors (they are
    cast to ``dtype``, optionally made non-contiguous with ``strided_like`` when 4-D, and made leaves requiring
    grad). Gradients come from one random cotangent per output.
    """
    (o64, od, ob), (g64, gd, gb) = forward_backward_triplet(run, ref, inputs64, dtype, noncontig)
    for i, (a, b, c) in enumerate(zip(ob, o64, od)):
        assert_close_to_reference(a, b, c, name=f"{name} output[{i}]")
    for i, (a, b, c) in enumerate(zip(gb, g64, gd)):
        if b is None:
            continue
        if a is None:
            raise AssertionError(f"{name}: backend gives no gradient for input {i}")
        assert_close_to_reference(a, b, c, name=f"{name} grad[{i}]")


__all__ = ["ATOL_FLOOR", "assert_close_to_reference", "available_backends", "compare_with_reference",
           "forward_backward_triplet",
           "random_padding_mask", "reference", "strided_like"]
