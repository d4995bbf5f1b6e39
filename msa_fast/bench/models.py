"""Model benchmark: forward and training-step time and peak memory per model on dataset-shaped inputs.

``msa-fast bench models [--models dashfusion lnln hme] [--batch-size 16] [--full-bert] [--variants bert features]
[--work fast equal] [--backends auto torch] [--modes forward train] [--repeats 3] [--device cpu|cuda] [--in-process]
[--json FILE]``

Cases = model × variant × work × backend × mode, each from the model's factory ``MSAModel.bench_inputs`` (the method
package's ``bench.py``: ``setup(batch_size, dataset, full_bert, work=..., **overrides) -> (model, batch)``):

- variants: ``bert`` = the factory's model with a randomly initialised BERT (1-layer ``TINY_BERT_CONFIG`` by default;
  ``--full-bert`` = a BERT-base-sized random ``BertConfig``, 12 layers, no download); ``features`` = the factory
  with ``use_text_features=True``: its synthetic batch carries random precomputed (B, L_t, 768) text features,
  BERT removed (models without that option get no row).
- work: ``fast`` = the library's defaults (exact shortcuts included); ``equal`` = exactly the official training
  step's work (LNLN: both full passes; DashFusion: full-length text; see ``msa_fast.models.bench_factory``) — the
  mode to set beside the official code, side by side.
- backends: ``auto`` (what users get) and ``torch`` (the PyTorch reference backend, via
  ``msa_fast.ops.use_backend("torch")`` when ops provides it, else the environment variable
  ``MSA_FAST_BACKEND=torch``); ``speedup`` = torch time / auto time of the same case.
- modes: ``forward`` = ``model.eval()`` + ``torch.no_grad()``; ``train`` = ``model.train()``, ``training_step``
  (the full objective, e.g. DashFusion's 7B-sample partner pass after ``prepare_epoch(1, batch)``), backward and the
  trainer's update: the model's own optimizers and parameter groups (``msa_fast.train.OptimizerSet``) and its
  gradient clipping (e.g. HME's value clipping at 0.8), as ``msa-fast train`` steps.

Timing: ``--warmup`` untimed calls, then the median (and min) of ``--repeats`` wall-clock calls (CUDA synchronised).
Work: ``gflop`` = one call's FLOPs counted by ``torch.utils.flop_counter`` with the ops on the torch reference (the
fused kernels are opaque to the counter; the arithmetic is the same), ``gflops`` = gflop / median time, and
``gemm_frac`` = that over this process's measured fp32 GEMM rate (best of five 1024³ matmuls, CPU): how close the
step runs to the machine's GEMM ceiling.
Memory, measured honestly per case: every case runs in a **fresh subprocess** (no allocator state or cached
buffers shared between cases). ``peak_rss_mb`` = the process's peak RSS (``VmHWM``, not ``ru_maxrss``, which keeps
the parent's peak across fork + exec) after the timed calls (whole process:
Python, torch, the model, the batch); ``delta_mb`` = ``peak_rss_mb`` − RSS right after setup, the extra memory the
calls needed (a lower bound when setup itself peaked higher). On CUDA ``cuda_peak_mb`` =
``torch.cuda.max_memory_allocated`` during the calls. ``--in-process`` skips the subprocesses (faster, no memory
columns).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

def _benchmarked_methods() -> tuple[str, ...]:
    """Method packages that ship a benchmark factory (``msa_fast/models/<method>/bench.py``): a folder scan, so the
    ``--models`` choices need neither torch nor a hand-kept list."""
    root = Path(__file__).resolve().parents[1] / "models"
    return tuple(sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file() and (p / "bench.py").is_file()))


MODELS = _benchmarked_methods()
VARIANTS = ("bert", "features")
WORK = ("fast", "equal")
BACKENDS = ("auto", "torch")
MODES = ("forward", "train")

#: ``--smoke``: batch 2, one timed call, no warm-up, in this process, tiny BERT.
SMOKE = {"batch_size": 2, "repeats": 1, "warmup": 0, "in_process": True, "full_bert": False}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS, metavar="MODEL",
                   help=f"models to benchmark: {' '.join(MODELS)} (default: all)")
    p.add_argument("--dataset", default="mosi", choices=("mosi", "mosei", "sims"), help="input shapes (mosi)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (16)")
    p.add_argument("--full-bert", action="store_true", help="BERT-base-sized random BERT instead of the tiny one")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="bert / features")
    p.add_argument("--work", nargs="+", default=["fast"], choices=WORK,
                   help="fast (the library's defaults) / equal (exactly the official step's work) (fast)")
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS, help="auto / torch")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="forward / train")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each case")
    p.add_argument("--in-process", action="store_true", help="no subprocess per case (no memory columns)")


def available_models(names) -> dict[str, Any]:
    """{name: model class} for the names among ``names`` that have a benchmark factory."""
    from ..models.registry import get_model_class

    return {name: get_model_class(name) for name in names if name in MODELS}


# ---- one case ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def backend_context(backend: str):
    """``msa_fast.ops.use_backend(backend)`` if ops provides it, else ``MSA_FAST_BACKEND`` for the duration."""
    if backend == "auto":
        yield
        return
    import msa_fast.ops as ops

    if hasattr(ops, "use_backend"):
        with ops.use_backend(backend):
            yield
        return
    old = os.environ.get("MSA_FAST_BACKEND")
    os.environ["MSA_FAST_BACKEND"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MSA_FAST_BACKEND", None)
        else:
            os.environ["MSA_FAST_BACKEND"] = old


def build_case(model_name: str, variant: str, batch_size: int = 16, dataset: str = "mosi", full_bert: bool = False,
               device: str = "cpu", work: str = "fast"):
    """(model, batch) of one benchmark case, or None when the model has no ``use_text_features`` option."""
    from ..models.registry import get_config, get_model_class

    extra = {}
    if variant == "features":
        if "use_text_features" not in get_config(model_name, dataset):
            return None
        extra["use_text_features"] = True
    model, batch = get_model_class(model_name).bench_inputs(batch_size=batch_size, dataset=dataset,
                                                            full_bert=full_bert and variant == "bert", work=work,
                                                            **extra)
    return model.to(device), batch.to(device)


def time_case(model, batch, mode: str, repeats: int = 3, warmup: int = 1) -> dict[str, float]:
    """Median / min milliseconds of ``repeats`` calls of ``mode`` after ``warmup`` calls, the process's peak RSS
    right after them (``peak_rss_mb``; ``cuda_peak_mb`` on CUDA) and then — so that its memory stays out of the
    peaks — the counted ``gflop`` of one call."""
    import torch

    cuda = batch.labels.is_cuda
    if mode == "forward":
        model.eval()

        def call():
            with torch.no_grad():
                model(batch)
    elif mode == "train":
        call = train_step_call(model, batch)
    else:
        raise ValueError(f"mode must be 'forward' or 'train', got {mode!r}")
    for _ in range(warmup):
        call()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    from . import peak_rss_mb

    out = {"ms": statistics.median(times), "min_ms": min(times), "peak_rss_mb": peak_rss_mb()}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # counted last: the count runs the torch reference composition, whose memory (e.g. DashFusion's materialised
    # attention matrices) must not enter the peaks above
    out["gflop"] = counted_gflop(call)
    return out


def train_step_call(model, batch):
    """The benchmarks' training step on ``batch`` as a no-argument callable: ``model.train()`` and
    ``prepare_epoch(1, batch)`` once (the batch is the whole "train split": DashFusion's partner pools), then per call
    ``training_step`` → backward → the trainer's update — for every backend the model's own optimizers / parameter
    groups (``msa_fast.train.OptimizerSet``) and its gradient clipping, as ``msa-fast train`` steps. Shared by
    ``bench models`` and ``bench official`` (msa_fast's side of the side-by-side step)."""
    model.train()
    model.prepare_epoch(1, batch)
    from ..train.config import TrainConfig
    from ..train.optim import OptimizerSet

    cfg = TrainConfig().resolve(model.config)
    optim = OptimizerSet(model, cfg, steps_per_epoch=1)

    def call():
        optim.zero_grad()
        model.training_step(batch)["loss"].backward()
        optim.clip_and_step(model, cfg)

    return call


def counted_gflop(call) -> Optional[float]:
    """GFLOP of one ``call()`` as ``torch.utils.flop_counter`` counts it (matmuls, convolutions, SDPA), run with the
    ops forced to the torch reference: the fused C++ / Triton kernels are opaque to the counter, and the reference
    composition does the same arithmetic, so both backends' rows report the work of the same step."""
    from torch.utils.flop_counter import FlopCounterMode

    import msa_fast.ops as ops

    try:
        with ops.use_backend("torch"), FlopCounterMode(display=False) as counter:
            call()
    except AssertionError:  # the counter's module tracker fails on some no-grad forwards (HME): no count
        return None
    return counter.get_total_flops() / 1e9


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    """This process's fp32 GEMM rate (GFLOP/s, best of ``repeats`` n×n×n matmuls): the ceiling the model rows are
    compared with."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def run_case(case: dict) -> Optional[dict]:
    """Build, time and measure one case in this process (the subprocess entry point)."""
    import gc

    import torch

    from . import rss_mb

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    with backend_context(case["backend"]):
        built = build_case(case["model"], case["variant"], case["batch_size"], case["dataset"], case["full_bert"],
                           case["device"], case.get("work", "fast"))
        if built is None:
            return None
        model, batch = built
        gc.collect()
        before = rss_mb()
        result = time_case(model, batch, case["mode"], case["repeats"], case["warmup"])
    result.update(delta_mb=max(0.0, result["peak_rss_mb"] - before))
    if not batch.labels.is_cuda and result["gflop"] is not None:
        gemm = gemm_gflops()
        achieved = result["gflop"] / (result["ms"] / 1e3)
        result.update(gflops=achieved, gemm_frac=achieved / gemm)
    return result


def _case_main(text: str) -> None:
    print("BENCH_RESULT " + json.dumps(run_case(json.loads(text))))


def _run_subprocess(case: dict) -> Optional[dict]:
    env = dict(os.environ)
    env.pop("MSA_FAST_BACKEND", None)  # "auto" must not inherit a user's override
    if case["backend"] != "auto":
        env["MSA_FAST_BACKEND"] = case["backend"]
    code = "import sys; from msa_fast.bench.models import _case_main; _case_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0][:200]}
    return json.loads(lines[-1][len("BENCH_RESULT "):])


# ---- suite -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> list[dict]:
    """Rows ``{model, variant, work, backend, mode, batch, ms, min_ms, speedup, gflop, gflops, gemm_frac, peak_rss_mb,
    delta_mb[, cuda_peak_mb]}``."""
    factories = available_models(args.models)
    missing = [m for m in args.models if m not in factories]
    if missing:
        print(f"(no benchmark factory msa_fast/bench/models_<name>.py for: {', '.join(missing)})", file=sys.stderr)
    rows = []
    for model in factories:
        for variant, work in ((v, w) for v in args.variants for w in getattr(args, "work", ["fast"])):
            for mode in args.modes:
                results = {}
                for backend in args.backends:
                    case = {"model": model, "variant": variant, "work": work, "backend": backend, "mode": mode,
                            "batch_size": args.batch_size, "dataset": args.dataset, "full_bert": args.full_bert,
                            "device": args.device, "repeats": args.repeats, "warmup": args.warmup,
                            "threads": args.threads}
                    if args.in_process:
                        try:
                            res = run_case(case)
                        except Exception as err:  # noqa: BLE001 - one failing case must not hide the others
                            res = {"error": f"{type(err).__name__}: {err}"[:200]}
                        if res:
                            res.pop("peak_rss_mb", None), res.pop("delta_mb", None)
                    else:
                        res = _run_subprocess(case)
                    if res is None:  # variant not supported by this model
                        continue
                    results[backend] = res
                    bert = ("bert-base" if args.full_bert else "tiny-bert") if variant == "bert" else "features"
                    rows.append({"model": model, "variant": bert, "work": work, "backend": backend, "mode": mode,
                                 "batch": args.batch_size, **{k: res.get(k) for k in
                                                              ("ms", "min_ms", "gflop", "gflops", "gemm_frac",
                                                               "peak_rss_mb", "delta_mb")},
                                 **({"cuda_peak_mb": res["cuda_peak_mb"]} if "cuda_peak_mb" in res else {}),
                                 "error": res.get("error", "")})
                if "auto" in results and "torch" in results and results["auto"].get("ms") and \
                        results["torch"].get("ms"):
                    speed = results["torch"]["ms"] / results["auto"]["ms"]
                    for row in rows[-len(results):]:
                        row["speedup"] = speed if row["backend"] == "auto" else 1.0
    keys = ["model", "variant", "work", "backend", "mode", "batch", "ms", "min_ms", "speedup", "gflop", "gflops", "gemm_frac",
            "peak_rss_mb", "delta_mb", "cuda_peak_mb", "error"]
    present = [k for k in keys if any(k in r and r[k] not in (None, "") for r in rows) or k in keys[:7]]
    return [{k: r.get(k) for k in present} for r in rows]


def main(args: argparse.Namespace) -> int:
    from . import format_table, write_outputs

    rows = run(args)
    print(format_table(rows))
    print(f"(median of {args.repeats} calls after {args.warmup} warm-up; {args.device}; speedup = torch / auto; "
          "memory = per-case subprocess peak RSS (VmHWM))" if not args.in_process else
          f"(median of {args.repeats} calls after {args.warmup} warm-up; {args.device}; speedup = torch / auto)")
    write_outputs(args, rows)  # --json / --csv / --plot (shared: msa_fast.bench.write_outputs)
    return 0
