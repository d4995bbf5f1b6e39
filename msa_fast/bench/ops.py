"""Fused ops vs the official eager composition, torch SDPA and backend="auto" (MSA shapes, forward / forward+backward).

``msa-fast bench ops`` (tiny shapes; ``--full`` or env MSA_FAST_BENCH_FULL=1 for MOSI: B=32, H=8, text 50, audio
376, vision 501, head dim D = 16 / 32 / 64, bottleneck K = 8 / 4). ``attention``, ``multi_source`` and
``bottleneck`` run with ragged padding masks (masked = True: the C++ kernel skips padded key tiles) and without
(masked = False: what DashFusion's temporal alignment, LNLN's hyper-modality layer and Multi_CA call). Providers:
- ``eager``: matmul → masked_fill → softmax → matmul per source (the official modules; ``bottleneck``: one call per
  modality, ``multi_source``: one call per source, summed);
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` per source with a boolean mask;
- ``cpp``: msa_fast's C++/OpenMP backend (one call for all sources / modalities);
- ``auto``: the op with ``backend="auto"``, i.e. what the models actually run (on CPU the C++ kernel or, where
  measured faster, torch SDPA: see ``msa_fast.ops.attention``);
- on CUDA: ``triton`` (msa_fast kernels) with ``triton.testing.do_bench``.
``expert_mixture`` (dense gated mixture of E expert FFNs d → h → d, GELU; full: B=16 x 150 tokens, d=128, h=512,
E=4): ``eager`` = the Python loop over experts (``testing.reference.expert_mixture_ref``), ``bmm`` = one batched
composition (torch.baddbmm over the expert stack → gelu → torch.baddbmm → gate-weighted sum), ``cpp``, ``auto`` /
``triton``.

Timing: the providers of a case run interleaved, one call each per repetition (round robin, the starting provider
rotating from one repetition to the next), so that outside load hits them alike. Columns: median ms per provider
over ``--repeat`` repetitions, paired ratios ``eager/cpp``, ``sdpa/cpp``, ``eager/auto``, ``sdpa/auto`` (the median
over repetitions of the ratio of the two calls of the same repetition; > 1: cpp / auto faster), the minimum ms per
provider, the GEMM bound of the case (``gflop`` counted on the eager composition, ``floor_ms`` at the fp32 GEMM rate
measured in the same run, ``gemm_frac`` = floor / auto, ``eager/floor`` = the most any same-FLOP kernel could gain
over eager here: :func:`gemm_bound`), optional peak extra memory (``--memory``: RSS growth of one run in a fresh
process) and a roofline estimate
(FLOPs, bytes moved by a fused kernel vs the eager composition, and the H100 lower bound) to judge GPU numbers.
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
#: CPU providers of each op, in column order (``make_case`` adds "triton"; benchmarks/bench_ops.py builds its
#: parameter list from this table, tests/test_bench_output.py checks it against ``make_case``).
PROVIDERS = {op: ("eager", "sdpa", "cpp", "auto") for op in ("attention", "multi_source", "bottleneck",
                                                              "self_attention_dropout")}
PROVIDERS.update(masked_mean=("eager", "cpp", "auto"), dropout=("eager", "cpp", "auto"),
                 expert_mixture=("eager", "bmm", "cpp", "auto"))
#: Ops whose cases come with and without padding masks (the others: masked_mean always masked, the rest maskless).
MASKABLE = ("attention", "multi_source", "bottleneck", "self_attention_dropout")
#: Paired ratio columns: (numerator, denominator) providers; "sdpa" reads "bmm" for expert_mixture.
RATIOS = (("eager", "cpp"), ("sdpa", "cpp"), ("eager", "auto"), ("sdpa", "auto"))
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
                 "auto": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, backend="auto"),
                 "triton": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, backend="triton")}
        inputs, qk = [q, k, v], t_len * v_len
        io = B * H * D * (2 * t_len + 2 * v_len) * el
    elif op == "self_attention_dropout":  # DashFusion's vision encoder: 501 frames, attention dropout 0.5 (training)
        q, k, v = rnd(B, H, v_len, D), rnd(B, H, v_len, D), rnd(B, H, v_len, D)
        m = _lengths_mask(B, v_len, g, device) if masked else None
        provs = {"eager": lambda q, k, v: eager_attention(q, k, v, m, dropout_p=0.5),
                 "sdpa": lambda q, k, v: sdpa_attention(q, k, v, m, dropout_p=0.5),
                 "cpp": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, dropout_p=0.5, backend="cpp"),
                 "auto": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, dropout_p=0.5, backend="auto"),
                 "triton": lambda q, k, v: ops.attention(q, k, v, key_padding_mask=m, dropout_p=0.5,
                                                         backend="triton")}
        inputs, qk = [q, k, v], v_len * v_len
        io = B * H * D * 4 * v_len * el
    elif op == "dropout":  # p = 0.1 on (B, frames, H·D) activations
        x = rnd(B, v_len, H * D)
        provs = {"eager": lambda x: F.dropout(x, 0.1, True),
                 "cpp": lambda x: ops.dropout(x, 0.1, backend="cpp"),
                 "auto": lambda x: ops.dropout(x, 0.1, backend="auto"),
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
                 "auto": lambda q, ka, va, kv_, vv: ops.multi_source_attention(q, [(ka, va, ma), (kv_, vv, mv)],
                                                                               backend="auto"),
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
                 "auto": lambda *t: ops.bottleneck_exchange(t[:3], t[3:6], t[6:], qpm if masked else None,
                                                            backend="auto"),
                 "triton": lambda *t: ops.bottleneck_exchange(t[:3], t[3:6], t[6:], qpm if masked else None,
                                                              backend="triton")}
        inputs, qk = [*qs, *ks, *vs], sum(lens) * K
        io = B * H * D * (2 * sum(lens) + 6 * K) * el
    elif op == "masked_mean":
        x = rnd(B, v_len, H * D)
        valid = ~_lengths_mask(B, v_len, g, device)
        provs = {"eager": lambda x: (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1),
                 "cpp": lambda x: ops.masked_mean(x, valid, backend="cpp"),
                 "auto": lambda x: ops.masked_mean(x, valid, backend="auto"),
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
                 "auto": lambda *t: ops.expert_mixture(*t, backend="auto"),
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
    """Median wall time (ms) of ``repeat`` calls after ``warmup`` (one provider alone; the suite uses
    :func:`time_interleaved`)."""
    return statistics.median(time_interleaved({"run": run}, repeat, warmup)["run"])


def time_interleaved(runs: dict[str, Callable[[], None]], repeat: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times (ms) of each provider, interleaved: in repetition i every provider runs once, round robin,
    starting at provider i mod n (the starting provider rotates), after ``warmup`` untimed rounds.
    → {name: [ms of repetition 0, 1, …]}: entry i of two providers comes from the same repetition (pair them with
    :func:`paired_ratio`)."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeat):
        start = i % len(names)
        for name in names[start:] + names[:start]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over repetitions of num[i] / den[i] (both timed in repetition i): a load spike during one
    repetition moves both sides of its ratio, not the median of one provider only."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio needs two equally long, non-empty timing lists ({len(num)} vs {len(den)})")
    return statistics.median(a / b for a, b in zip(num, den))


def summarize(times: dict[str, list[float]], names=None, ratios=RATIOS) -> dict:
    """Columns of one case from :func:`time_interleaved`'s timings: ``{name}_ms`` (median), the paired ratios
    ``a/b`` and ``{name}_min`` (minimum); a provider in ``names`` but not timed gets None, and so do its ratios.
    ``names[1]`` stands for "sdpa" in ``ratios`` (e.g. "bmm")."""
    names = list(names or times)
    second = names[1] if len(names) > 1 else "sdpa"
    row: dict = {f"{n}_ms": statistics.median(times[n]) if n in times else None for n in names}
    for a, b in ratios:
        a = second if a == "sdpa" else a
        if a in names and b in names:
            row[f"{a}/{b}"] = paired_ratio(times[a], times[b]) if a in times and b in times else None
    row.update({f"{n}_min": min(times[n]) if n in times else None for n in names})
    return row


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
    """→ (shape, [(op, D, K, masked)]): every case of ``msa-fast bench ops`` (and of benchmarks/bench_ops.py)."""
    shape = MOSI if full else TINY
    rows = []
    for op in ("attention", "multi_source"):
        for D in (16, 32, 64):
            for masked in (True, False):
                rows.append((op, D, 0, masked))
    for K in (8, 4):
        for masked in (True, False):
            rows.append(("bottleneck", 16, K, masked))
    rows.append(("masked_mean", 16, 0, True))
    rows.append(("self_attention_dropout", 16, 0, True))
    rows.append(("dropout", 16, 0, True))
    rows.append(("expert_mixture", 128 if full else 16, 4, True))
    return shape, rows


def _masked_label(op: str, masked: bool):
    return masked if op in MASKABLE or op == "masked_mean" else ""


def run_cpu(full: bool = False, repeat: int = 5, modes=("fwd", "fwd+bwd"), memory: bool = False,
            only: Optional[str] = None) -> list[dict]:
    """One row per case and mode: providers timed interleaved (:func:`time_interleaved`), columns from
    :func:`summarize` (median ms, paired ratios, min ms)."""
    from .. import _ext

    if not _ext.cpp_available():
        raise RuntimeError("the C++ extension is not built: nothing to compare on CPU")
    from .models import counted_gflop, gemm_gflops

    shape, cases = _cases(full)
    rows = []
    gemm = gemm_gflops() if any(not only or op == only for op, *_ in cases) else None
    for op, D, K, masked in cases:
        if only and op != only:
            continue
        case = make_case(op, shape, D, K, masked)
        names = ("eager", "bmm" if "bmm" in case["providers"] else "sdpa", "cpp", "auto")
        for mode in modes:
            bwd = mode == "fwd+bwd"
            runs = {n: _step(case["providers"][n], case["inputs"], bwd) for n in names if n in case["providers"]}
            row = dict(op=op, D=D, K=K or "", masked=_masked_label(op, masked), mode=mode)
            row.update(summarize(time_interleaved(runs, repeat), names))
            row.update(gemm_bound(counted_gflop(runs["eager"]), gemm, row))
            if memory:
                for name in ("eager", "cpp"):
                    row[f"{name}_peak_MB"] = peak_extra_mb(op, shape, D, K, masked, name, bwd)
            rows.append(row)
    return rows


def gemm_bound(gflop: Optional[float], gemm: float, row: dict) -> dict:
    """Where a case stands against this machine's GEMM ceiling: ``gflop`` = the eager composition's matmul FLOPs
    (``torch.utils.flop_counter``; the fused kernels do the same products), ``floor_ms`` = gflop at the fp32 GEMM
    rate measured in this run, ``gemm_frac`` = floor_ms / auto_ms (the issue's "fraction of the GEMM rate"), and
    ``eager/floor`` = eager_ms / floor_ms: the largest speed-up over eager any kernel doing these FLOPs at the GEMM
    rate could reach (below 2 the "2× eager" goal cannot be met on this machine by computing the same products).
    Ops without matmuls (masked mean, dropout) get no columns."""
    if not gflop or not gemm:
        return {}
    floor = gflop / gemm * 1e3
    auto = row.get("auto_ms")
    return {"gflop": gflop, "floor_ms": floor, "gemm_frac": floor / auto if auto else None,
            "eager/floor": row["eager_ms"] / floor if row.get("eager_ms") else None}


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
            row = dict(op=op, D=D, K=K or "", masked=_masked_label(op, masked), mode=mode)
            for name in ("eager", "sdpa", "bmm", "triton", "auto"):
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
    parser.add_argument("--repeat", type=int, default=5,
                        help="interleaved repetitions per case (each provider once per repetition; medians and "
                             "paired ratios reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's)")
    parser.add_argument("--memory", action="store_true", help="also measure peak extra RSS per run (slow)")
    parser.add_argument("--op", default=None, choices=OPS,
                        help="run only this op's cases (default: all; the roofline table always lists all)")
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd", "both"], default="both",
                        help="forward only, forward+backward, or both (default both)")


def main(args: argparse.Namespace) -> int:
    import torch

    from . import write_outputs

    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ("fwd", "fwd+bwd") if args.mode == "both" else (args.mode,)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"CPU, {torch.get_num_threads()} threads, {'MOSI' if args.full else 'tiny'} shapes, {args.repeat} "
          f"interleaved repetitions: median ms, paired ratios (median of per-repetition ratios), min ms"
          + (f"; load average at start {load[0]:.2f}" if load else ""))
    rows = run_cpu(full=args.full, repeat=args.repeat, modes=modes, memory=args.memory, only=args.op)
    groups: dict[tuple, list] = {}  # rows with different provider columns (expert_mixture: bmm) in their own table
    for r in rows:
        groups.setdefault(tuple(r), []).append(r)
    print("\n\n".join(format_table(g) for g in groups.values()))
    if load:
        print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    roof = roofline(full=True)
    print("\nRoofline estimate (fp32, MOSI shapes; H100 lower bound = max(FLOPs/67 TFLOP/s, bytes/3.35 TB/s)):")
    print(format_table(roof))
    gpu = None
    if torch.cuda.is_available():
        gpu = run_gpu(full=args.full, only=args.op)
        print("\nCUDA (triton.testing.do_bench):")
        print(format_table(gpu))
    write_outputs(args, rows, roofline=roof, **({"cuda_rows": gpu} if gpu is not None else {}))
    return 0
