"""Mixture of expert FFNs (MIDG's Mixture of Invariant Experts): a dense gated mixture and a top-k routed one.

- ``expert_mixture(x, gates, w1, b1, w2, b2, activation="gelu")``:
  out[n] = Σ_e gates[n, e] · (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e]).
  Computed as two large GEMMs with the gate scaling in between: Z = x @ [w1_1 … w1_E] + b1 (N, E·h);
  S = act(Z) scaled blockwise by the gates; out = S @ [w2_1; …; w2_E] + gates @ b2. Only Z is saved for the
  backward (act(Z) and S are recomputed in the backward's fused pass).
- ``expert_mixture_topk(x, expert_idx, expert_weight, w1, b1, w2, b2, activation="gelu")``:
  out[n] = Σ_j expert_weight[n, j] · FFN_{expert_idx[n, j]}(x[n]).
  Permute (token slots sorted by expert id, stable: histogram + prefix sum + scatter) → grouped GEMM per expert
  segment → unpermute (gather, weighted sum over the k slots; deterministic, no atomics). Saves the permutation,
  the pre-activations Z (N·k, h) and the expert outputs Y (N·k, d).

Shapes: x (N, d); gates (N, E) (any real values — usually a softmax); w1 (E, d, h); b1 (E, h); w2 (E, h, d);
b2 (E, d); expert_idx (N, k) integer in [0, E); expert_weight (N, k). activation: "gelu" (exact, erf) or "relu".
All floating inputs share one dtype and device. Gradients flow to x, gates / expert_weight, w1, b1, w2, b2.

Backends (``backend="auto" | "triton" | "cpp" | "torch"``, see ``_dispatch``): "torch" = the same two-GEMM /
grouped formulation in PyTorch with a hand-written backward (fp16 / bf16 computed in fp32; the top-k path loops
over experts in Python); "cpp" = ``msa_fast._C`` (BLAS GEMMs — per expert for the first layer, one K = E·h GEMM
for the second — with fused OpenMP passes for bias + activation + gate scaling + gates @ b2, and in the backward
for act' + dgates + db1 + db2; C++ counting sort for top-k);
"triton" = ``msa_fast.kernels.expert_mixture`` (gate scaling / bias terms fused into the GEMM prologues and
epilogues, device-side permutation). Bad arguments raise ValueError naming the argument and what was expected
(TypeError when an argument is not a tensor at all).
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _ext
from . import _dispatch

ACTIVATIONS = ("gelu", "relu")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------ validation
def _tensor(t, name: str, shape_doc: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    return t


def _check_shape(t: Tensor, name: str, shape: tuple, shape_doc: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {tuple(shape)}, got {tuple(t.shape)}")


def _validate(x, mix, mix_name, mix_doc, w1, b1, w2, b2, activation):
    """Shared checks → (N, d, E, h). ``mix`` is gates (N, E) or expert_weight (N, k) (only N is checked here)."""
    x = _tensor(x, "x", "(N, d)")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (N, d) (flatten leading dims first), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    N, d = x.shape
    w1 = _tensor(w1, "w1", "(E, d, h)")
    if w1.dim() != 3 or w1.shape[1] != d:
        raise ValueError(f"w1 must have shape (E, d, h) with d = {d} (x's last dim), got {tuple(w1.shape)}")
    E, _, h = w1.shape
    if E < 1 or h < 1:
        raise ValueError(f"w1 must have E >= 1 experts and h >= 1 hidden units, got shape {tuple(w1.shape)}")
    mix = _tensor(mix, mix_name, mix_doc)
    for t, name, shape, doc in ((b1, "b1", (E, h), "(E, h)"), (w2, "w2", (E, h, d), "(E, h, d)"),
                                (b2, "b2", (E, d), "(E, d)")):
        _check_shape(_tensor(t, name, doc), name, shape, doc)
    for t, name in ((mix, mix_name), (w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; every floating input must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; every input must be on one device")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return N, d, E, h


# ------------------------------------------------------------------------------------------------ backend "torch"
def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def act_fwd(z: Tensor, activation: str) -> Tensor:
    return torch.nn.functional.gelu(z) if activation == "gelu" else torch.relu(z)  # gelu: exact (erf)


def act_backward(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    """grad · act'(z) in one fused ATen op (relu: 0 at z = 0, as torch)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, z)
    return torch.ops.aten.threshold_backward(grad, z, 0)


def _torch_dense_forward(x, gates, w1, b1, w2, b2, activation):
    acc = _acc(x)
    N, d = x.shape
    E, _, h = w1.shape
    xa, g = x.to(acc), gates.to(acc)
    w1c = w1.to(acc).permute(1, 0, 2).reshape(d, E * h)
    z = torch.addmm(b1.to(acc).reshape(1, E * h), xa, w1c)  # (N, E·h)
    s = (act_fwd(z, activation).view(N, E, h) * g[:, :, None]).view(N, E * h)
    out = torch.addmm(g @ b2.to(acc), s, w2.to(acc).reshape(E * h, d))
    return out.to(x.dtype), (z,)


def _torch_dense_backward(x, gates, w1, b1, w2, b2, activation, saved, dout):
    (z,) = saved
    acc = _acc(x)
    N, d = x.shape
    E, _, h = w1.shape
    xa, g, go = x.to(acc), gates.to(acc), dout.to(acc)
    ds = (go @ w2.to(acc).reshape(E * h, d).t()).view(N, E, h)
    z3 = z.view(N, E, h)
    a = act_fwd(z3, activation)
    dg = (ds * a).sum(-1) + go @ b2.to(acc).t()
    s = (a * g[:, :, None]).view(N, E * h)
    dw2 = (s.t() @ go).view(E, h, d)
    db2 = g.t() @ go
    dz = act_backward(ds * g[:, :, None], z3, activation).view(N, E * h)
    dw1 = (xa.t() @ dz).view(d, E, h).permute(1, 0, 2)
    db1 = dz.sum(0).view(E, h)
    dx = dz @ w1.to(acc).permute(1, 0, 2).reshape(d, E * h).t()
    return tuple(t.to(x.dtype) for t in (dx, dg, dw1, db1, dw2, db2))


def permute_slots(expert_idx: Tensor, num_experts: int):
    """Stable sort of the N·k token slots by expert id → (order, offsets): ``order[p]`` = slot (n·k + j) at sorted
    position p, ``offsets`` (E + 1,) int64 segment bounds per expert (the torch backend's permutation)."""
    flat = expert_idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def _torch_topk_forward(x, expert_idx, expert_weight, w1, b1, w2, b2, activation):
    acc = _acc(x)
    N, d = x.shape
    E, _, h = w1.shape
    k = expert_idx.shape[1]
    order, offsets = permute_slots(expert_idx, E)
    xp = x.to(acc)[order // k]  # (M, d) rows sorted by expert
    z = torch.empty(N * k, h, dtype=acc, device=x.device)
    y = torch.empty(N * k, d, dtype=acc, device=x.device)
    bounds = offsets.tolist()
    for e in range(E):  # reference backend: a Python loop over experts is fine here
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            z[a:b] = torch.addmm(b1[e].to(acc), xp[a:b], w1[e].to(acc))
            y[a:b] = torch.addmm(b2[e].to(acc), act_fwd(z[a:b], activation), w2[e].to(acc))
    pos = torch.empty_like(order)
    pos[order] = torch.arange(N * k, device=x.device)
    ys = y[pos].view(N, k, d)
    out = (ys * expert_weight.to(acc)[:, :, None]).sum(1)
    return out.to(x.dtype), (order, pos, offsets, z, y)


def _torch_topk_backward(x, expert_idx, expert_weight, w1, b1, w2, b2, activation, saved, dout):
    order, pos, offsets, z, y = saved
    acc = _acc(x)
    N, d = x.shape
    E, _, h = w1.shape
    k = expert_idx.shape[1]
    go = dout.to(acc)
    dwt = (y[pos].view(N, k, d) * go[:, None, :]).sum(-1)
    tok = order // k
    dy = expert_weight.to(acc).reshape(-1)[order][:, None] * go[tok]  # (M, d) sorted
    xp = x.to(acc)[tok]
    dxp = torch.zeros(N * k, d, dtype=acc, device=x.device)
    dw1, db1 = torch.zeros(E, d, h, dtype=acc, device=x.device), torch.zeros(E, h, dtype=acc, device=x.device)
    dw2, db2 = torch.zeros(E, h, d, dtype=acc, device=x.device), torch.zeros(E, d, dtype=acc, device=x.device)
    bounds = offsets.tolist()
    for e in range(E):
        a, b = bounds[e], bounds[e + 1]
        if b == a:
            continue
        ze, dye = z[a:b], dy[a:b]
        dw2[e] = act_fwd(ze, activation).t() @ dye
        db2[e] = dye.sum(0)
        dz = act_backward(dye @ w2[e].to(acc).t(), ze, activation)
        dw1[e] = xp[a:b].t() @ dz
        db1[e] = dz.sum(0)
        dxp[a:b] = dz @ w1[e].to(acc).t()
    dx = dxp[pos].view(N, k, d).sum(1)
    return tuple(t.to(x.dtype) for t in (dx, dwt, dw1, db1, dw2, db2))


_torch_impl = SimpleNamespace(dense_forward=_torch_dense_forward, dense_backward=_torch_dense_backward,
                              topk_forward=_torch_topk_forward, topk_backward=_torch_topk_backward)


# ------------------------------------------------------------------------------------------------ backend "cpp"
def _cpp_lib():
    lib = _ext.cpp_extension()
    if lib is None or not hasattr(lib, "expert_mixture_forward"):
        raise RuntimeError("the C++ extension msa_fast._C (with expert_mixture_*) is not built; rebuild with "
                           "pip install --no-build-isolation -e .")
    return lib


def _kc(t: Tensor, dt: torch.dtype) -> Tensor:
    return t.to(dt).contiguous()


def _cpp_dense_forward(x, gates, w1, b1, w2, b2, activation):
    dt = _acc(x)
    out, z = _cpp_lib().expert_mixture_forward(*(_kc(t, dt) for t in (x, gates, w1, b1, w2, b2)),
                                               activation == "gelu")
    return out.to(x.dtype), (z,)


def _cpp_dense_backward(x, gates, w1, b1, w2, b2, activation, saved, dout):
    dt = _acc(x)
    grads = _cpp_lib().expert_mixture_backward(*(_kc(t, dt) for t in (x, gates, w1, b1, w2, b2)), saved[0],
                                               _kc(dout, dt), activation == "gelu")
    return tuple(g.to(x.dtype) for g in grads)


def _cpp_topk_forward(x, expert_idx, expert_weight, w1, b1, w2, b2, activation):
    dt = _acc(x)
    out, order, pos, offsets, z, y = _cpp_lib().expert_mixture_topk_forward(
        _kc(x, dt), expert_idx.to(torch.int64).contiguous(), *(_kc(t, dt) for t in (expert_weight, w1, b1, w2, b2)),
        activation == "gelu")
    return out.to(x.dtype), (order, pos, offsets, z, y)


def _cpp_topk_backward(x, expert_idx, expert_weight, w1, b1, w2, b2, activation, saved, dout):
    dt = _acc(x)
    order, pos, offsets, z, y = saved
    grads = _cpp_lib().expert_mixture_topk_backward(
        _kc(x, dt), _kc(expert_weight, dt), _kc(w1, dt), _kc(w2, dt), order, pos, offsets, z, y, _kc(dout, dt),
        activation == "gelu")
    return tuple(g.to(x.dtype) for g in grads)


_cpp_impl = SimpleNamespace(dense_forward=_cpp_dense_forward, dense_backward=_cpp_dense_backward,
                            topk_forward=_cpp_topk_forward, topk_backward=_cpp_topk_backward)


def _cpp_has_op() -> bool:
    lib = _ext.cpp_extension()
    return lib is not None and hasattr(lib, "expert_mixture_forward")


def _impl(backend: str, x: Tensor):
    name = _dispatch.resolve(backend, x.device)
    if name == "cpp" and not _cpp_has_op():
        if backend == "cpp":
            _cpp_lib()  # raises with the rebuild hint
        name = "torch"  # "auto" with an extension built before this op existed
    if name == "triton" and x.dtype == torch.float64:
        if backend == "triton":
            raise ValueError("backend='triton' takes fp32 / fp16 / bf16 inputs, got float64 (use backend='torch' "
                             "or 'auto')")
        name = "torch"  # "auto": float64 (gradcheck) runs the torch backend on CUDA
    if name == "torch":
        return _torch_impl
    if name == "cpp":
        return _cpp_impl
    return importlib.import_module("msa_fast.kernels.expert_mixture")


# ------------------------------------------------------------------------------------------------ autograd
class ExpertMixtureFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, activation, impl):
        out, saved = impl.dense_forward(x, gates, w1, b1, w2, b2, activation)
        ctx.save_for_backward(x, gates, w1, b1, w2, b2, *saved)
        ctx.activation, ctx.impl = activation, impl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, gates, w1, b1, w2, b2, *saved = ctx.saved_tensors
        grads = ctx.impl.dense_backward(x, gates, w1, b1, w2, b2, ctx.activation, tuple(saved), dout.contiguous())
        return (*grads, None, None)


class ExpertMixtureTopkFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_idx, expert_weight, w1, b1, w2, b2, activation, impl):
        out, saved = impl.topk_forward(x, expert_idx, expert_weight, w1, b1, w2, b2, activation)
        ctx.save_for_backward(x, expert_idx, expert_weight, w1, b1, w2, b2, *saved)
        ctx.activation, ctx.impl = activation, impl
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, expert_idx, expert_weight, w1, b1, w2, b2, *saved = ctx.saved_tensors
        dx, dwt, dw1, db1, dw2, db2 = ctx.impl.topk_backward(x, expert_idx, expert_weight, w1, b1, w2, b2,
                                                             ctx.activation, tuple(saved), dout.contiguous())
        return dx, None, dwt, dw1, db1, dw2, db2, None, None


# ------------------------------------------------------------------------------------------------ public API
def expert_mixture(x: Tensor, gates: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, *,
                   activation: str = "gelu", backend: str = "auto") -> Tensor:
    """Dense gated mixture of E expert FFNs → (N, d).

    out[n] = Σ_e gates[n, e] · (act(x[n] @ w1[e] + b1[e]) @ w2[e] + b2[e]); x (N, d), gates (N, E) (already
    normalised, any real values allowed), w1 (E, d, h), b1 (E, h), w2 (E, h, d), b2 (E, d); activation "gelu"
    (exact erf) or "relu". Differentiable in every floating input. Reference: ``testing.reference.expert_mixture_ref``.
    """
    N, d, E, h = _validate(x, gates, "gates", "(N, E)", w1, b1, w2, b2, activation)
    _check_shape(gates, "gates", (N, E), "(N, E)")
    return ExpertMixtureFn.apply(x, gates, w1, b1, w2, b2, activation, _impl(backend, x))


def expert_mixture_topk(x: Tensor, expert_idx: Tensor, expert_weight: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                        b2: Tensor, *, activation: str = "gelu", backend: str = "auto") -> Tensor:
    """Top-k routed mixture → (N, d): out[n] = Σ_j expert_weight[n, j] · FFN_{expert_idx[n, j]}(x[n]).

    expert_idx (N, k) integer (int64; int32 accepted) in [0, E) — the same expert may appear twice in a row;
    expert_weight (N, k); other shapes as ``expert_mixture``. Differentiable in x, expert_weight, w1, b1, w2, b2.
    Checking the index range reads the indices (one device sync on CUDA).
    Reference: ``testing.reference.expert_mixture_topk_ref``.
    """
    N, d, E, h = _validate(x, expert_weight, "expert_weight", "(N, k)", w1, b1, w2, b2, activation)
    expert_idx = _tensor(expert_idx, "expert_idx", "(N, k)")
    if expert_idx.dtype.is_floating_point or expert_idx.dtype.is_complex or expert_idx.dtype == torch.bool:
        raise ValueError(f"expert_idx must be an integer tensor (int64) of shape (N, k), got {expert_idx.dtype}")
    if expert_idx.dim() != 2 or expert_idx.shape[0] != N or expert_idx.shape[1] < 1:
        raise ValueError(f"expert_idx must have shape (N, k) with N = {N} (x's rows) and k >= 1, "
                         f"got {tuple(expert_idx.shape)}")
    k = expert_idx.shape[1]
    _check_shape(expert_weight, "expert_weight", (N, k), "(N, k)")
    if expert_idx.device != x.device:
        raise ValueError(f"expert_idx is on {expert_idx.device} but x is on {x.device}")
    if expert_idx.numel():
        lo, hi = int(expert_idx.min()), int(expert_idx.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"expert_idx must lie in [0, {E}) (E = w1.shape[0] experts), got min {lo} max {hi}")
    expert_idx = expert_idx.to(torch.int64).contiguous()
    return ExpertMixtureTopkFn.apply(x, expert_idx, expert_weight, w1, b1, w2, b2, activation,
                                     _impl(backend, x))


__all__ = ["ACTIVATIONS", "expert_mixture", "expert_mixture_topk", "permute_slots"]
