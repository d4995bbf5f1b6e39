"""Triton fused-op benchmarks at MOSI shapes + a roofline model.

    python benchmarks/bench_triton.py              # roofline model (any machine) + GPU timings when CUDA is present
    python benchmarks/bench_triton.py --model-only # only the model
    python benchmarks/bench_triton.py --dtype fp32 --batch 64

Shapes (MOSI, MulT-style): B=32, H=8, text 50, audio 376, vision 501 tokens, head dim D=16/32, bottleneck K=8/4.
The roofline rows are a MODEL, NOT MEASURED: minimal HBM traffic (every tensor read/written once) and matmul FLOPs
against A100/H100 peak bandwidth and FLOP rates; real kernels at these sizes are further bounded by launch latency.
GPU timings use ``triton.testing.do_bench`` (median ms) for the Triton kernels and the same-dtype PyTorch reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from typing import Callable, Optional

import torch

MOSI = dict(B=32, H=8, text=50, audio=376, vision=501)
HEAD_DIMS = (16, 32)
BOTTLENECK_KEYS = (8, 4)

# Peak numbers (vendor datasheets, SXM parts, dense): HBM GB/s, tensor-core 16-bit TFLOP/s, fp32 (non-TF32) TFLOP/s.
GPUS = {
    "A100-80GB": dict(bw_gbs=2039.0, tflops16=312.0, tflops32=19.5),
    "H100-SXM": dict(bw_gbs=3350.0, tflops16=989.0, tflops32=67.0),
}


@dataclasses.dataclass
class OpCost:
    op: str
    shape: str
    flops: float
    bytes: float


def _attention_cost(name: str, B: int, H: int, Lq: int, src_lens: tuple[int, ...], D: int, eb: int,
                    backward: bool) -> OpCost:
    """Segmented attention: FLOPs of the matmuls (4·Lq·Lk·D fwd; bwd 2.5x, FlashAttention convention)."""
    Lk, S = sum(src_lens), len(src_lens)
    fwd_flops = 4.0 * B * H * Lq * Lk * D
    qo = B * H * Lq * D * eb
    kv = 2 * B * H * Lk * D * eb
    lse = B * H * S * Lq * 4
    osrc = S * B * H * Lq * D * 4 if S > 1 else 0
    masks = B * (Lq + Lk)
    if not backward:
        return OpCost(name + " fwd", f"B{B} H{H} Lq{Lq} Lk{Lk} S{S} D{D}", fwd_flops, 2 * qo + kv + lse + osrc + masks)
    # reads q, k, v, dout, lse, delta; writes dq, dk, dv
    return OpCost(name + " bwd", f"B{B} H{H} Lq{Lq} Lk{Lk} S{S} D{D}", 2.5 * fwd_flops,
                  2 * qo + 2 * kv + 2 * lse + masks + qo)


def _bottleneck_cost(B: int, H: int, lens: tuple[int, ...], K: int, D: int, eb: int, backward: bool) -> OpCost:
    Lq, M = sum(lens), len(lens)
    fwd_flops = 4.0 * B * H * Lq * K * D
    q = B * H * Lq * D * eb
    kv = 2 * B * H * M * K * D * eb
    lse = B * H * Lq * 4
    shape = f"B{B} H{H} Lq{Lq} M{M} K{K} D{D}"
    if not backward:
        return OpCost("bottleneck_exchange fwd", shape, fwd_flops, 2 * q + kv + lse)
    return OpCost("bottleneck_exchange bwd", shape, 2.5 * fwd_flops, 3 * q + 2 * kv + 2 * lse + q)


def _masked_mean_cost(B: int, L: int, Dm: int, eb: int, backward: bool) -> OpCost:
    shape = f"B{B} L{L} D{Dm}"
    if not backward:
        return OpCost("masked_mean fwd", shape, 2.0 * B * L * Dm, B * L * Dm * eb + B * L + B * Dm * eb)
    return OpCost("masked_mean bwd", shape, 1.0 * B * L * Dm, B * L * Dm * eb + B * L + B * Dm * eb)


def roofline_costs(dtype_bytes: int = 2, mosi: dict = MOSI) -> list[OpCost]:
    """FLOPs and minimal bytes per op at MOSI shapes (forward and backward)."""
    B, H = mosi["B"], mosi["H"]
    lens = {m: mosi[m] for m in ("text", "audio", "vision")}
    costs = []
    for D in HEAD_DIMS:
        for bwd in (False, True):
            for tgt in lens:  # MulT cross-modal pairs: target attends to one other modality
                for src in lens:
                    if src != tgt:
                        costs.append(_attention_cost(f"attention {tgt}<-{src}", B, H, lens[tgt], (lens[src],), D,
                                                     dtype_bytes, bwd))
            for tgt in lens:  # one query stream attending to both other modalities, separate softmaxes
                srcs = tuple(lens[s] for s in lens if s != tgt)
                costs.append(_attention_cost(f"multi_source {tgt}<-others", B, H, lens[tgt], srcs, D, dtype_bytes,
                                             bwd))
            for K in BOTTLENECK_KEYS:
                costs.append(_bottleneck_cost(B, H, tuple(lens.values()), K, D, dtype_bytes, bwd))
            for L in lens.values():
                costs.append(_masked_mean_cost(B, L, H * D, dtype_bytes, bwd))
    return costs


def modelled_time_us(cost: OpCost, gpu: str, dtype_bytes: int) -> float:
    """max(bytes / peak bandwidth, FLOPs / peak FLOP rate) in µs: a MODEL, NOT MEASURED."""
    p = GPUS[gpu]
    tflops = p["tflops16"] if dtype_bytes == 2 else p["tflops32"]
    return max(cost.bytes / (p["bw_gbs"] * 1e9), cost.flops / (tflops * 1e12)) * 1e6


def print_roofline(dtype_bytes: int = 2, mosi: dict = MOSI, file=None) -> list[dict]:
    """Print (and return) the roofline table; runs on CPU. All times are 'model, not measured'."""
    file = file or sys.stdout
    rows = []
    gpus = list(GPUS)
    print(f"# Roofline estimate at MOSI shapes ({8 * dtype_bytes}-bit inputs) -- model, not measured", file=file)
    hdr = f"{'op':<34s} {'shape':<34s} {'GFLOP':>8s} {'MB':>8s} {'FLOP/B':>7s} " + " ".join(
        f"{g + ' us':>15s}" for g in gpus)
    print(hdr, file=file)
    for c in roofline_costs(dtype_bytes, mosi):
        times = {g: modelled_time_us(c, g, dtype_bytes) for g in gpus}
        rows.append(dict(op=c.op, shape=c.shape, gflop=c.flops / 1e9, mbytes=c.bytes / 1e6,
                         **{f"model_us_{g}": t for g, t in times.items()}))
        print(f"{c.op:<34s} {c.shape:<34s} {c.flops / 1e9:8.3f} {c.bytes / 1e6:8.2f} {c.flops / c.bytes:7.1f} "
              + " ".join(f"{times[g]:15.2f}" for g in gpus), file=file)
    print("(model, not measured: minimal HBM traffic; launch latency of ~2-5 us per kernel not included)", file=file)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# GPU timings (skipped without CUDA)
# ------------------------------------------------------------------------------------------------------------------
def _bench(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100)


def run_gpu_benchmarks(dtype: torch.dtype = torch.float16, mosi: dict = MOSI, file=None) -> Optional[list]:
    """Time the Triton kernels and the same-dtype PyTorch reference at MOSI shapes (median ms via do_bench)."""
    file = file or sys.stdout
    if not torch.cuda.is_available():
        print("# GPU timings skipped: no CUDA device", file=file)
        return None
    from msa_fast.kernels import attention as attn
    from msa_fast.kernels import bottleneck_exchange as bx
    from msa_fast.kernels import masked_mean as mm
    from msa_fast.testing import reference as ref

    dev = "cuda"
    B, H = mosi["B"], mosi["H"]
    lens = {m: mosi[m] for m in ("text", "audio", "vision")}
    rows = []
    print(f"# Measured on {torch.cuda.get_device_name()} ({dtype}), median ms (triton.testing.do_bench)", file=file)
    print(f"{'op':<34s} {'D':>3s} {'triton fwd':>11s} {'triton bwd':>11s} {'torch fwd':>10s} {'torch f+b':>10s}",
          file=file)
    for D in HEAD_DIMS:
        scale = D ** -0.5
        for tgt, srcs in (("text", ("audio",)), ("vision", ("audio",)), ("text", ("audio", "vision"))):
            Lq, src_lens = lens[tgt], tuple(lens[s] for s in srcs)
            offs = (0,) + tuple(sum(src_lens[:i + 1]) for i in range(len(src_lens)))
            Lk = offs[-1]
            q = torch.randn(B, H, Lq, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(B, H, Lk, D, device=dev, dtype=dtype, requires_grad=True)
            kvalid = torch.ones(B, Lk, dtype=torch.bool, device=dev)
            out, lse, o_src = attn.forward(q, k, v, kvalid, offs, None, scale)
            dout = torch.randn_like(out)
            o_s = out.float()[None] if o_src is None else o_src
            delta = (dout.float()[None] * o_s).sum(-1).permute(1, 2, 0, 3).contiguous()
            t_f = _bench(lambda: attn.forward(q, k, v, kvalid, offs, None, scale))
            t_b = _bench(lambda: attn.backward(q, k, v, kvalid, offs, None, scale, lse, delta, dout))
            sources = [(k[:, :, a:e], v[:, :, a:e], None) for a, e in zip(offs, offs[1:])]
            r_f = _bench(lambda: ref.multi_source_attention_ref(q, sources, scale))
            r_fb = _bench(lambda: ref.multi_source_attention_ref(q, sources, scale).backward(dout))
            name = f"attention {tgt}<-{'+'.join(srcs)}"
            rows.append(dict(op=name, D=D, triton_fwd=t_f, triton_bwd=t_b, torch_fwd=r_f, torch_fwd_bwd=r_fb))
            print(f"{name:<34s} {D:3d} {t_f:11.4f} {t_b:11.4f} {r_f:10.4f} {r_fb:10.4f}", file=file)
        for K in BOTTLENECK_KEYS:
            seg = tuple(lens.values())
            offs = (0,) + tuple(sum(seg[:i + 1]) for i in range(len(seg)))
            q = torch.randn(B, H, offs[-1], D, device=dev, dtype=dtype)
            k = torch.randn(B, H, len(seg), K, D, device=dev, dtype=dtype)
            v = torch.randn_like(k)
            out, lse = bx.forward(q, offs, k, v, None, None, scale)
            dout = torch.randn_like(out)
            delta = (dout.float() * out.float()).sum(-1)
            t_f = _bench(lambda: bx.forward(q, offs, k, v, None, None, scale))
            t_b = _bench(lambda: bx.backward(q, offs, k, v, None, None, scale, lse, delta, dout))
            r_f = _bench(lambda: ref.bottleneck_exchange_ref(
                [q[:, :, a:e] for a, e in zip(offs, offs[1:])], list(k.unbind(2)), list(v.unbind(2)), scale=scale))
            name = f"bottleneck_exchange K{K}"
            rows.append(dict(op=name, D=D, triton_fwd=t_f, triton_bwd=t_b, torch_fwd=r_f))
            print(f"{name:<34s} {D:3d} {t_f:11.4f} {t_b:11.4f} {r_f:10.4f} {'':>10s}", file=file)
        x = torch.randn(B, lens["vision"], H * D, device=dev, dtype=dtype)
        valid = torch.ones(B, lens["vision"], dtype=torch.bool, device=dev)
        dmean = torch.randn(B, H * D, device=dev, dtype=dtype)
        t_f = _bench(lambda: mm.forward(x, valid))
        t_b = _bench(lambda: mm.backward(x, valid, dmean))
        r_f = _bench(lambda: ref.masked_mean_ref(x, valid))
        rows.append(dict(op="masked_mean vision", D=D, triton_fwd=t_f, triton_bwd=t_b, torch_fwd=r_f))
        print(f"{'masked_mean vision':<34s} {D:3d} {t_f:11.4f} {t_b:11.4f} {r_f:10.4f} {'':>10s}", file=file)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    ap.add_argument("--batch", type=int, default=MOSI["B"])
    ap.add_argument("--model-only", action="store_true", help="print the roofline model only")
    args = ap.parse_args(argv)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    mosi = dict(MOSI, B=args.batch)
    print_roofline(torch.tensor([], dtype=dtype).element_size(), mosi)
    if not args.model_only:
        run_gpu_benchmarks(dtype, mosi)


def test_roofline_model_prints():
    """Plain check of the model (collected only if pytest's python_files includes bench_*.py)."""
    rows = print_roofline(2, file=io.StringIO())
    assert rows and all(r["gflop"] > 0 and r["mbytes"] > 0 for r in rows)


if __name__ == "__main__":
    main()
