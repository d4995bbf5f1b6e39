"""Fused ops vs the eager composition the official code uses vs torch SDPA (MSA shapes, forward / forward+backward).

``msa-fast bench ops`` (tiny shapes; ``--full`` or env MSA_FAST_BENCH_FULL=1 for MOSI: B=32, H=8, text 50, audio
376, vision 501, D = 16 / 32, bottleneck K = 8 / 4). Providers:
- ``eager``: matmul → masked_fill → softmax → matmul per source (the official modules; ``bottleneck``: one call per
  modality, ``multi_source``: one call per source, summed);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` per source with a boolean mask;
- ``cpp``: msa_fast's C++/OpenMP backend (one call for all sources / modalities);
- on CUDA: ``triton`` (msa_fast kernels) with ``triton.testing.do_bench``.
``expert_mixture`` (dense gated mixture of E expert FFNs d → h → d, GELU; full: B=16 x 150 tokens, d=128, h=512,
E=4): ``eager`` = the Python loop over experts (``testing.reference.expert_mixture_ref``), ``bmm`` = one batched
composition (torch.baddbmm over the expert stack → gelu → torch.baddbmm → gate-weighted sum), ``cpp`` / ``triton``.

Columns: median ms over ``--repeat`` runs, ratios ``eager/cpp`` and ``sdpa/cpp`` (> 1: cpp faster), optional
peak extra memory (``--memory``: RSS growth of one run in a fresh process) and a roofline estimate (FLOPs, bytes
moved by a fused kernel vs the eager composition, and the H100 lower bound) to judge GPU numbers.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import TYPE_CHECKING, Callable, Optional

from . import format_table

if TYPE_CHECKING:  # torch is imported inside the functions: ``msa-fast bench ops --help`` must not pay for it
    import torch

#: The ops ``--op`` can select (every case of ``_cases`` uses one of them).
OPS = ("attention", "multi_source", "bottleneck", "masked_mean", "self_attention_dropout", "dropout",
       "expert_mixture")
MOSI = dict(B=32, H=8, text=50, audio=376, vision=501)
TINY = dict(B=2, H=2, text=8, audio=24, vision=30)
#: expert_mixture (MIDG's MoIE) shapes: B samples x (text + audio + vision) tokens, d = D, hidden h, E = K experts
MOE_MOSI = dict(B=16, L=50 + 50 + 50, h=512)
MOE_TINY = dict(B=2, L=12, h=32)
# H100 SXM: fp32 (non-tensor-core) 67 TFLOP/s, HBM3 3.35 TB/s — used only for the printed roofline bound
H100_FLOPS, H100_BW = 67e12, 3.35e12


# ------------------------------------------------------------------------------------------------ providers
def eager_attention(q, k, v, key_padding_mask=None, scale=None, dropout_p=0.0):
    """The official composition: scores = q kᵀ·s; masked_fill(-inf); softmax; (dropout;) @ v."""
    import torch
    import torch.nn.functional as F

    s = torch.matmul(q, k.transpose(-1, -2)) * (scale or q.shape[-1] ** -0.5)
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(F.dropout(p, dropout_p, True) if dropout_p > 0 else p, v)


def sdpa_attention(q, k, v, key_padding_mask=None, scale=None, dropout_p=0.0):
    import torch.nn.functional as F

    mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p)


def _lengths_mask(B: int, L: int, g: torch.Generator, device) -> torch.Tensor:
    import torch

    lengths = torch.randint(max(1, L // 2), L + 1, (B,), generator=g)  # ragged, never empty (eager would NaN)
    return (torch.arange(L)[None] >= lengths[:, None]).to(device)


def make_case(op: str, shape: dict, D: int, K: int = 8, masked: bool = True, device: str = "cpu",
              dtype: torch.dtype | None = None) -> dict:
    """→ dict(inputs=[leaf tensors], providers={name: fn(*inputs) -> tensor}, flops=fwd FLOPs, bytes_fused,
    bytes_eager). One factory shared by ``msa-fast bench ops`` and benchmarks/bench_ops.py; ``dtype`` defaults to
    torch.float32."""
    import torch
    import torch.nn.functional as F

    from .. import ops

    dtype = torch.float32 if dtype is None else dtype

    g = torch.Generator().manual_seed(0)
    B, H = shape["B"], shape["H"]
    t_len, a_len, v_len = shape["text"], shape["audio"], shape["vision"]
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    el = torch.tensor([], dtype=dtype).element_size()
    if op == "attention":  # text queries over vision
        q, k, v = rnd(B, H, t_len, D), rnd(B, H, v_len, D), rnd(B, H, v_len, D)
        m = _lengths_mask(B, v_len, g, device) if masked else None
        provs = {"eager": lambda q, k, v: eager_attention(q, k, v, m),
                 "sdpa": lambda q, k, v: sdpa_attention(q, k, v, m),
                 "cpp": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, backend="cpp"),
                 "triton": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, backend="triton")}
        inputs, qk = [q, k, v], t_len * v_len
        io = B * H * D * (2 * t_len + 2 * v_len) * el
    elif op == "self_attention_dropout":  # DashFusion's vision encoder: 501 frames, attention dropout 0.5 (training)
        q, k, v = rnd(B, H, v_len, D), rnd(B, H, v_len, D), rnd(B, H, v_len, D)
        m = _lengths_mask(B, v_len, g, device) if masked else None
        provs = {"eager": lambda q, k, v: eager_attention(q, k, v, m, dropout_p=0.5),
                 "sdpa": lambda q, k, v: sdpa_attention(q, k, v, m, dropout_p=0.5),
                 "cpp": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, dropout_p=0.5, backend="cpp"),
                 "triton": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, dropout_p=0.5,
                                                         backend="triton")}
        inputs, qk = [q, k, v], v_len * v_len
        io = B * H * D * 4 * v_len * el
    elif op == "dropout":  # p = 0.1 on (B, frames, H·D) activations
        x = rnd(B, v_len, H * D)
        provs = {"eager": lambda x: F.dropout(x, 0.1, True),
                 "cpp": lambda x: ops.dropout(x, 0.1, backend="cpp"),
                 "triton": lambda x: ops.dropout(x, 0.1, backend="triton")}
        return dict(inputs=[x], providers=provs, flops=x.numel(), bytes_fused=2 * x.numel() * el,
                    bytes_eager=4 * x.numel() * el)  # eager also writes and reads the mask
    elif op == "multi_source":  # text queries over audio and vision, one softmax each
        q = rnd(B, H, t_len, D)
        ka, va, kv_, vv = rnd(B, H, a_len, D), rnd(B, H, a_len, D), rnd(B, H, v_len, D), rnd(B, H, v_len, D)
        ma = _lengths_mask(B, a_len, g, device) if masked else None
        mv = _lengths_mask(B, v_len, g, device) if masked else None
        provs = {"eager": lambda q, ka, va, kv_, vv: eager_attention(q, ka, va, ma) + eager_attention(q, kv_, vv, mv),
                 "sdpa": lambda q, ka, va, kv_, vv: sdpa_attention(q, ka, va, ma) + sdpa_attention(q, kv_, vv, mv),
                 "cpp": lambda q, ka, va, kv_, vv: ops.multi_source_attention(q, [(ka, va, ma), (kv_, vv, mv)],
                                                                              backend="cpp"),
                 "triton": lambda q, ka, va, kv_, vv: ops.multi_source_attention(q, [(ka, va, ma), (kv_, vv, mv)],
                                                                                 backend="triton")}
        inputs, qk = [q, ka, va, kv_, vv], t_len * (a_len + v_len)
        io = B * H * D * (2 * t_len + 2 * (a_len + v_len)) * el
    elif op == "bottleneck":  # every modality token over its own projection of K bottleneck tokens
        lens = (t_len, a_len, v_len)
        qs = [rnd(B, H, L, D) for L in lens]
        ks = [rnd(B, H, K, D) for _ in lens]
        vs = [rnd(B, H, K, D) for _ in lens]
        qpm = [_lengths_mask(B, L, g, device) if masked else None for L in lens]

        def eager(*t):
            return [eager_attention(t[i], t[3 + i], t[6 + i]) for i in range(3)]

        def sdpa(*t):
            return [sdpa_attention(t[i], t[3 + i], t[6 + i]) for i in range(3)]

        provs = {"eager": eager, "sdpa": sdpa,
                 "cpp": lambda *t: ops.bottleneck_exchange(t[:3], t[3:6], t[6:], qpm if masked else None,
                                                           backend="cpp"),
                 "triton": lambda *t: ops.bottleneck_exchange(t[:3], t[3:6], t[6:], qpm if masked else None,
                                                              backend="triton")}
        inputs, qk = [*qs, *ks, *vs], sum(lens) * K
        io = B * H * D * (2 * sum(lens) + 6 * K) * el
    elif op == "masked_mean":
        x = rnd(B, v_len, H * D)
        valid = ~_lengths_mask(B, v_len, g, device)
        provs = {"eager": lambda x: (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1),
                 "cpp": lambda x: ops.masked_mean(x, valid, backend="cpp"),
                 "triton": lambda x: ops.masked_mean(x, valid, backend="triton")}
        inputs = [x]
        return dict(inputs=inputs, providers=provs, flops=B * v_len * H * D, bytes_fused=x.numel() * el,
                    bytes_eager=3 * x.numel() * el)
    elif op == "expert_mixture":  # D = d_model, K = number of experts
        from ..testing.reference import expert_mixture_ref

        moe = MOE_MOSI if shape == MOSI else MOE_TINY
        N, E, Hd = moe["B"] * moe["L"], K, moe["h"]
        x, gates = rnd(N, D), torch.softmax(rnd(N, E), -1)
        w1, b1 = rnd(E, D, Hd) * D ** -0.5, rnd(E, Hd) * 0.1
        w2, b2 = rnd(E, Hd, D) * Hd ** -0.5, rnd(E, D) * 0.1

        def bmm(x, gates, w1, b1, w2, b2):
            hid = F.gelu(torch.baddbmm(b1[:, None], x.expand(E, N, D), w1))  # (E, N, h)
            y = torch.baddbmm(b2[:, None], hid, w2)  # (E, N, d)
            return (y * gates.t()[:, :, None]).sum(0)

        provs = {"eager": lambda *t: expert_mixture_ref(*t),
                 "bmm": bmm,
                 "cpp": lambda *t: ops.expert_mixture(*t, backend="cpp"),
                 "triton": lambda *t: ops.expert_mixture(*t, backend="triton")}
        c = _formula(op, dict(shape, **moe), D, K, el)
        return dict(inputs=[x, gates, w1, b1, w2, b2], providers=provs, **c)
    else:
        raise ValueError(f"unknown op {op!r}")
    flops = 4 * B * H * qk * D
    scores = B * H * qk * el
    return dict(inputs=inputs, providers=provs, flops=flops, bytes_fused=io, bytes_eager=io + 4 * scores)


# ------------------------------------------------------------------------------------------------ timing
def _step(fn: Callable, inputs: list, backward: bool) -> Callable[[], None]:
    import torch

    leaves = [t.detach().requires_grad_(backward) for t in inputs]

    def run():
        out = fn(*leaves)
        if backward:
            outs = out if isinstance(out, (list, tuple)) else [out]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
            for t in leaves:
                t.grad = None
    return run


def time_ms(run: Callable[[], None], repeat: int, warmup: int = 1) -> float:
    """Median wall time (ms) of ``repeat`` calls after ``warmup``."""
    for _ in range(warmup):
        run()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _peak_rss_worker(args):  # runs in a fresh process (spawn)
    import resource

    import torch

    op, shape, D, K, masked, provider, backward = args
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    case = make_case(op, shape, D, K, masked)
    run = _step(case["providers"][provider], case["inputs"], backward)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0  # KiB → MiB


def peak_extra_mb(op, shape, D, K, masked, provider, backward) -> float:
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_rss_worker, ((op, shape, D, K, masked, provider, backward),))


def _cases(full: bool):
    shape = MOSI if full else TINY
    rows = []
    for D in (16, 32):
        rows.append(("attention", D, 0, True))
        rows.append(("attention", D, 0, False))
        rows.append(("multi_source", D, 0, True))
    for K in (8, 4):
        rows.append(("bottleneck", 16, K, True))
    rows.append(("masked_mean", 16, 0, True))
    rows.append(("self_attention_dropout", 16, 0, True))
    rows.append(("dropout", 16, 0, True))
    rows.append(("expert_mixture", 128 if full else 16, 4, True))
    return shape, rows


def run_cpu(full: bool = False, repeat: int = 5, modes=("fwd", "fwd+bwd"), memory: bool = False,
            only: Optional[str] = None) -> list[dict]:
    from .. import _ext

    if not _ext.cpp_available():
        raise RuntimeError("the C++ extension is not built: nothing to compare on CPU")
    shape, cases = _cases(full)
    rows = []
    for op, D, K, masked in cases:
        if only and op != only:
            continue
        case = make_case(op, shape, D, K, masked)
        for mode in modes:
            bwd = mode == "fwd+bwd"
            row = dict(op=op, D=D, K=K or "", masked=masked, mode=mode)
            names = ("eager", "sdpa", "cpp") if "bmm" not in case["providers"] else ("eager", "bmm", "cpp")
            for name in names:
                if name in case["providers"]:
                    row[f"{name}_ms"] = time_ms(_step(case["providers"][name], case["inputs"], bwd), repeat)
                else:
                    row[f"{name}_ms"] = None
            row["eager/cpp"] = row["eager_ms"] / row["cpp_ms"]
            second = names[1]
            row[f"{second}/cpp"] = row[f"{second}_ms"] / row["cpp_ms"] if row[f"{second}_ms"] else None
            if memory:
                for name in ("eager", "cpp"):
                    row[f"{name}_peak_MB"] = peak_extra_mb(op, shape, D, K, masked, name, bwd)
            rows.append(row)
    return rows


def roofline(full: bool = True) -> list[dict]:
    """FLOPs and bytes per op (fused vs eager) with the H100 lower bound on time, for judging GPU numbers."""
    shape, cases = _cases(full)
    rows = []
    for op, D, K, masked in cases:
        if not masked:
            continue
        c = _formula(op, shape, D, K)
        t_fused = max(c["flops"] / H100_FLOPS, c["bytes_fused"] / H100_BW) * 1e3
        t_eager = max(c["flops"] / H100_FLOPS, c["bytes_eager"] / H100_BW) * 1e3
        rows.append(dict(op=op, D=D, K=K or "", GFLOP=c["flops"] / 1e9, MB_fused=c["bytes_fused"] / 2**20,
                         MB_eager=c["bytes_eager"] / 2**20, h100_fused_ms=t_fused, h100_eager_ms=t_eager))
    return rows


def _formula(op, shape, D, K, el=4):
    B, H, t, a, v = shape["B"], shape["H"], shape["text"], shape["audio"], shape["vision"]
    if op == "masked_mean":
        n = B * v * H * D
        return dict(flops=n, bytes_fused=n * el, bytes_eager=3 * n * el)
    if op == "dropout":
        n = B * v * H * D
        return dict(flops=n, bytes_fused=2 * n * el, bytes_eager=4 * n * el)
    if op == "expert_mixture":  # D = d, K = E; the fused path stores Z (N, E·h) once, eager writes/reads H and Y
        moe = MOE_MOSI if shape == MOSI else (shape if "L" in shape else MOE_TINY)
        N, Hd = moe["B"] * moe["L"], moe["h"]
        weights = 2 * K * D * Hd
        fused = (2 * N * D + N * K + weights + N * K * Hd) * el
        eager = fused + (3 * N * K * Hd + 2 * N * K * D) * el
        return dict(flops=4 * N * K * D * Hd, bytes_fused=fused, bytes_eager=eager)
    qk, io = {"attention": (t * v, 2 * t + 2 * v), "multi_source": (t * (a + v), 2 * t + 2 * (a + v)),
              "bottleneck": ((t + a + v) * K, 2 * (t + a + v) + 6 * K),
              "self_attention_dropout": (v * v, 4 * v)}[op]
    io *= B * H * D * el
    return dict(flops=4 * B * H * qk * D, bytes_fused=io, bytes_eager=io + 4 * B * H * qk * el)


def run_gpu(full: bool = True, only: Optional[str] = None) -> list[dict]:
    """CUDA: triton vs sdpa vs eager with triton.testing.do_bench (forward and forward+backward)."""
    from triton.testing import do_bench

    shape, cases = _cases(full)
    rows = []
    for op, D, K, masked in cases:
        if only and op != only:
            continue
        case = make_case(op, shape, D, K, masked, device="cuda")
        for mode in ("fwd", "fwd+bwd"):
            row = dict(op=op, D=D, K=K or "", masked=masked, mode=mode)
            for name in ("eager", "sdpa", "bmm", "triton"):
                if name in case["providers"]:
                    row[f"{name}_ms"] = do_bench(_step(case["providers"][name], case["inputs"], mode != "fwd"))
            rows.append(row)
    return rows


def run(quick: bool = True) -> list[dict]:
    """Short table for the demo: tiny shapes (quick) or MOSI shapes, CPU, forward and forward+backward."""
    return run_cpu(full=not quick, repeat=3 if quick else 5)


#: ``--smoke``: the tiny shapes, one timed run.
SMOKE = {"full": False, "repeat": 1, "memory": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", default=os.environ.get("MSA_FAST_BENCH_FULL") == "1",
                        help="MOSI shapes (B=32, H=8, text 50, audio 376, vision 501) instead of tiny ones")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="also measure peak extra RSS per run (slow)")
    parser.add_argument("--op", default=None, choices=OPS,
                        help="run only this op's cases (default: all; the roofline table always lists all)")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both",
                        help="forward only, forward+backward, or both (default both)")


def main(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ("fwd", "fwd+bwd") if args.mode == "both" else (args.mode,)
    print(f"CPU, {torch.get_num_threads()} threads, {'MOSI' if args.full else 'tiny'} shapes, median of "
          f"{args.repeat} runs")
    rows = run_cpu(full=args.full, repeat=args.repeat, modes=modes, memory=args.memory, only=args.op)
    groups: dict[tuple, list] = {}  # rows with different provider columns (expert_mixture: bmm) in their own table
    for r in rows:
        groups.setdefault(tuple(r), []).append(r)
    print("\n\n".join(format_table(g) for g in groups.values()))
    print("\nRoofline estimate (fp32, MOSI shapes; H100 lower bound = max(FLOPs/67 TFLOP/s, bytes/3.35 TB/s)):")
    print(format_table(roofline(full=True)))
    if torch.cuda.is_available():
        print("\nCUDA (triton.testing.do_bench):")
        print(format_table(run_gpu(full=args.full, only=args.op)))
    return 0
