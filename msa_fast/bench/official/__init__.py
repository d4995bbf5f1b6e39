"""Side by side with the official code: the official training step of DashFusion, LNLN or HME against msa_fast's equal-work step, in one process, on the same inputs, interleaved.

``msa-fast bench official --method hme --official-root /path/to/HME [--variants bert features] [--full-bert]
[--batch-size 16] [--repeats 5] [--warmup 1] [--threads 2] [--no-memory] [--json FILE]``

The official code is not part of msa_fast: ``--official-root`` is the path of your checkout of the method's
repository (ultramarineX/DashFusion, Haoyu-ha/LNLN, YetZzzzzz/HME; the specs and parity fixtures were written from
37ba417, 80a052c and 6f0c9a7), imported from there at run time. The official models' libraries must be
installed (DashFusion: einops, scikit-learn, scipy, pytorch-metric-learning==0.9.99 installed with --no-deps;
LNLN: einops, pyyaml; HME: einops, scikit-learn).
Nothing is downloaded: ``BertModel.from_pretrained`` / ``BertTokenizer.from_pretrained`` are patched to build a
randomly initialised BERT from the same config dict msa_fast uses (the 1-layer ``TINY_BERT_CONFIG``, or
``BERT_BASE_CONFIG`` with ``--full-bert``); DashFusion's in-forward tokenizer becomes a stand-in that returns exactly
the token ids of msa_fast's batch, so both sides see identical ids.

Per variant (``bert``: both sides run BERT; ``features``: both get the same precomputed (B, L, 768) text features,
ours with ``use_text_features=True``, the official model with its BERT replaced by a pass-through):

- ours: ``MSAModel.bench_inputs(batch_size, work="equal")`` (exactly the official step's work) and the benchmarks'
  training step (``msa_fast.bench.models.train_step_call``: training_step, backward, the trainer's optimizers and
  clipping);
- the official model: its MOSI hyper-parameters, built under the same seed; the batch converted to the official
  inputs; the step as its training script does it (forward, every loss term, backward, its clipping, its optimizer
  and parameter groups — see each adapter's docstring in ``msa_fast/bench/official/``);
- check first: the official weights are loaded into ours and an eval-mode forward (dropout off) of each side must
  give the same prediction (max error within ``--check-tol``), proving the inputs are the same — else the run fails;
- timing: ``--warmup`` calls of each, then ``--repeats`` rounds, each timing the official step and ours (the order
  alternates every round); ``official_ms`` / ``ours_ms`` = medians, ``official/ours`` = the median of the per-round
  ratios (> 1: msa_fast is faster);
- work: ``gflop`` of one step of each side as ``torch.utils.flop_counter`` counts it (should be close: equal work);
- memory: each side again in its own fresh subprocess (same warm-up and calls): ``peak_rss_mb`` = its peak
  RSS after the calls (whole process: Python, torch, libraries, model, batch; ``VmHWM``, since ``ru_maxrss``
  inherits the parent's peak across fork + exec on Linux), ``delta_mb`` = that minus the RSS right before the
  calls (``--no-memory`` skips).

Timings on a shared machine are noisy: quote ratios measured on a quiet one, with ``--threads`` fixed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

METHODS = ("dashfusion", "lnln", "hme")
VARIANTS = ("bert", "features")
#: ``--smoke``: batch 2, one round, no warm-up, tiny BERT, no memory subprocesses.
SMOKE = {"batch_size": 2, "repeats": 1, "warmup": 0, "full_bert": False, "no_memory": True}
#: adapter class per method (module, class name), imported only when a run needs it.
ADAPTERS = {"dashfusion": ("dashfusion", "DashFusionAdapter"), "lnln": ("lnln", "LNLNAdapter"),
            "hme": ("hme", "HMEAdapter")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=METHODS, help="the method to compare: " + " | ".join(METHODS))
    p.add_argument("--official-root", default=None, metavar="PATH",
                   help="path of your checkout of the method's official repository (required; never part of msa_fast)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                   help="bert (both sides run BERT) / features (both read the same precomputed text features)")
    p.add_argument("--full-bert", action="store_true",
                   help="BERT-base-sized random BERT on both sides (default: the 1-layer tiny one)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (16)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, each one step of each side (5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each side first (1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads, here and in the subprocesses")
    p.add_argument("--seed", type=int, default=0, help="seed of both models' construction and of the batch (0)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (cpu)")
    p.add_argument("--check-tol", type=float, default=1e-5,
                   help="the forward check: |official − ours| ≤ tol·(1 + |official|) per prediction (1e-5)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-side memory subprocesses")
    p.add_argument("--our-config", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key of our model's config (VALUE as JSON, else a string), e.g. "
                        "prune_rows=false for DashFusion without its exact row pruning; repeatable")


def get_adapter(method: str, root: Any, device: str = "cpu"):
    """The method's adapter for the checkout at ``root`` (validated: a clear error naming --official-root)."""
    import importlib

    if method not in ADAPTERS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    module, name = ADAPTERS[method]
    cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return cls(root, device)


def _bert_config(full_bert: bool, features: bool) -> dict:
    from ...nn.text_encoder import BERT_BASE_CONFIG, TINY_BERT_CONFIG

    return dict(BERT_BASE_CONFIG if full_bert and not features else TINY_BERT_CONFIG)


def _variant_label(variant: str, full_bert: bool) -> str:
    return ("bert-base" if full_bert else "tiny-bert") if variant == "bert" else "features"


def parse_our_config(items) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` → {key: value}, VALUE read as JSON (``false``, ``2``, ``"x"``) or else kept a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--our-config takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def build_ours(method: str, batch_size: int, full_bert: bool, features: bool, seed: int, device: str, adapter,
               our_config: Optional[dict] = None):
    """Our (model, batch) of the equal-work step (``our_config``: further config overrides)."""
    from ...models.registry import get_model_class

    overrides = {**adapter.our_overrides(features), **(our_config or {})}
    return get_model_class(method).bench_inputs(batch_size=batch_size, full_bert=full_bert and not features,
                                                seed=seed, device=device, work="equal", **overrides)


def check_same_prediction(adapter, official, ours, batch, features: bool, tol: float) -> float:
    """Official weights into ours, eval-mode forward of both on the converted batch: the predictions must agree
    (``|a − e| ≤ tol·(1 + |e|)``); → the max abs error. Raises RuntimeError otherwise."""
    import torch

    ours.load_official_state_dict(official.state_dict())
    expected = adapter.predict(official, adapter.inputs(batch, features)).detach().float().cpu()
    ours.eval()
    with torch.no_grad():
        got = ours(batch)["M"].detach().float().reshape(-1).cpu()
    if got.shape != expected.shape:
        raise RuntimeError(f"{adapter.method}: prediction shapes differ: official {tuple(expected.shape)}, ours "
                           f"{tuple(got.shape)}")
    err = (got - expected).abs()
    if not bool(torch.isfinite(got).all() and torch.isfinite(expected).all()) or \
            bool((err > tol * (1 + expected.abs())).any()):
        raise RuntimeError(f"{adapter.method} ({'features' if features else 'bert'}): the official and our forward "
                           f"disagree on the converted batch (max |diff| {err.max().item():.3g} > tol {tol:g}): the "
                           f"inputs or the weights differ, no timing is meaningful. official {expected.tolist()}, "
                           f"ours {got.tolist()}")
    return float(err.max())


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def interleaved_times(official_call, our_call, repeats: int, warmup: int, cuda: bool = False) -> dict[str, Any]:
    """``warmup`` untimed calls of each, then ``repeats`` rounds timing both (official first in even rounds, ours
    first in odd ones) → medians, minima, the median of the per-round ratios official/ours and the rounds."""
    for _ in range(warmup):
        official_call()
        our_call()
    _sync(cuda)
    rounds = []
    for r in range(repeats):
        order = (("official", official_call), ("ours", our_call))
        if r % 2:
            order = order[::-1]
        t = {}
        for side, call in order:
            start = time.perf_counter()
            call()
            _sync(cuda)
            t[side] = (time.perf_counter() - start) * 1e3
        rounds.append({"round": r, "first": order[0][0], "official_ms": t["official"], "ours_ms": t["ours"],
                       "ratio": t["official"] / t["ours"]})
    off = [r["official_ms"] for r in rounds]
    ours = [r["ours_ms"] for r in rounds]
    return {"official_ms": statistics.median(off), "ours_ms": statistics.median(ours),
            "ratio": statistics.median(r["ratio"] for r in rounds), "official_min_ms": min(off),
            "ours_min_ms": min(ours), "rounds": rounds}


# ------------------------------------------------------------------------------------------------ memory
def run_side(case: dict) -> dict:
    """One side alone in this (fresh) process: build, ``warmup`` + ``repeats`` steps → {peak_rss_mb, delta_mb,
    ms}. The official side reads the batch (and DashFusion's partner rows) the parent saved, so it never builds our
    model."""
    import gc

    import torch

    from .. import peak_rss_mb, rss_mb

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    features = case["variant"] == "features"
    adapter = get_adapter(case["method"], case["root"], case["device"])
    if case["side"] == "ours":
        from ..models import train_step_call

        model, batch = build_ours(case["method"], case["batch_size"], case["full_bert"], features, case["seed"],
                                  case["device"], adapter, case.get("our_config"))
        call = train_step_call(model, batch)
    else:
        blob = torch.load(case["batch_file"], weights_only=False)  # written by this harness's parent process
        batch = blob["batch"].to(case["device"])
        model = adapter.build(_bert_config(case["full_bert"], features), features, case["seed"])
        call = adapter.make_step(model, adapter.inputs(batch, features, blob["extra"]))
    cuda = case["device"].startswith("cuda")
    gc.collect()
    before = rss_mb()
    for _ in range(case["warmup"]):
        call()
    _sync(cuda)
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        call()
        _sync(cuda)
        times.append((time.perf_counter() - start) * 1e3)
    peak = peak_rss_mb()
    out = {"peak_rss_mb": peak, "delta_mb": max(0.0, peak - before),
           "ms": statistics.median(times) if times else None}
    if cuda:
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _side_main(text: str) -> None:
    print("BENCH_RESULT " + json.dumps(run_side(json.loads(text))))


def _run_side_subprocess(case: dict) -> dict:
    code = "import sys; from msa_fast.bench.official import _side_main; _side_main(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(case)], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"{case['side']} memory subprocess: {tail[0][:200]}"}
    return json.loads(lines[-1][len("BENCH_RESULT "):])


# ------------------------------------------------------------------------------------------------ one variant
def run_variant(adapter, args: argparse.Namespace, variant: str) -> tuple[dict, dict]:
    """(row, details) of one variant: check, interleaved timing, counted work, per-side memory."""
    import tempfile
    import warnings

    import torch

    from ..models import counted_gflop, train_step_call

    if args.threads:
        torch.set_num_threads(int(args.threads))
    features = variant == "features"
    our_config = parse_our_config(getattr(args, "our_config", []))
    ours, batch = build_ours(args.method, args.batch_size, args.full_bert, features, args.seed, args.device, adapter,
                             our_config)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*enable_nested_tensor.*")
        official = adapter.build(_bert_config(args.full_bert, features), features, args.seed)
    check_err = check_same_prediction(adapter, official, ours, batch, features, args.check_tol)

    our_call = train_step_call(ours, batch)
    extra = adapter.step_extras(ours, batch)
    official_call = adapter.make_step(official, adapter.inputs(batch, features, extra))
    cuda = str(args.device).startswith("cuda")
    times = interleaved_times(official_call, our_call, args.repeats, args.warmup, cuda)
    gflop = {"official": counted_gflop(official_call), "ours": counted_gflop(our_call)}

    memory: dict[str, dict] = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory(prefix="msa_fast_official_") as tmp:
            batch_file = os.path.join(tmp, "batch.pt")
            torch.save({"batch": batch.to("cpu"), "extra": extra}, batch_file)
            del ours, official, our_call, official_call
            for side in ("official", "ours"):
                case = {"method": args.method, "root": str(adapter.code_dir), "variant": variant, "side": side,
                        "full_bert": args.full_bert, "batch_size": args.batch_size, "seed": args.seed,
                        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
                        "device": args.device, "batch_file": batch_file, "our_config": our_config}
                memory[side] = _run_side_subprocess(case)
    row = {"method": args.method, "variant": _variant_label(variant, args.full_bert), "batch": args.batch_size,
           "official_ms": times["official_ms"], "ours_ms": times["ours_ms"], "official/ours": times["ratio"],
           "official_min_ms": times["official_min_ms"], "ours_min_ms": times["ours_min_ms"],
           "official_gflop": gflop["official"], "ours_gflop": gflop["ours"]}
    for side in ("official", "ours"):
        m = memory.get(side, {})
        row[f"{side}_peak_rss_mb"] = m.get("peak_rss_mb")
        row[f"{side}_delta_mb"] = m.get("delta_mb")
        if "cuda_peak_mb" in m:
            row[f"{side}_cuda_peak_mb"] = m["cuda_peak_mb"]
    row["check_max_err"] = check_err
    errors = [m["error"] for m in memory.values() if "error" in m]
    row["error"] = "; ".join(errors)
    details = {"method": args.method, "variant": row["variant"], "rounds": times["rounds"],
               "memory_runs": memory}
    return row, details


def main(args: argparse.Namespace) -> int:
    from .. import format_table, write_outputs

    adapter = get_adapter(args.method, args.official_root, args.device)  # validates --official-root first
    for name in ("batch_size", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    parse_our_config(args.our_config)  # a malformed KEY=VALUE fails before anything is built
    rows, details = [], []
    for variant in args.variants:
        row, detail = run_variant(adapter, args, variant)
        rows.append(row)
        details.append(detail)
    if not any(r.get("error") for r in rows):
        for r in rows:
            r.pop("error", None)
    print(format_table(rows))
    notes = {"official_repo": adapter.repo, "official_code_dir": str(adapter.code_dir),
             "spec_commit": adapter.commit, "official_step": adapter.step_note,
             "official_optimizer": adapter.optimizer_note, "patches": list(dict.fromkeys(adapter.notes))}
    print(f"(official {adapter.repo} from {adapter.code_dir}; {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up; official/ours = median of per-round ratios, > 1: msa_fast faster; memory = "
          f"per-side subprocess peak RSS)")
    print(f"official step: {adapter.step_note}")
    print(f"official optimizer: {adapter.optimizer_note}")
    for note in notes["patches"]:
        print(f"patch: {note}")
    for r in rows:
        a, b = r.get("official_gflop"), r.get("ours_gflop")
        if a and b and abs(a - b) > 0.05 * max(a, b):
            print(f"note: {r['variant']}: counted work differs by more than 5% (official {a:.3g} GFLOP, ours "
                  f"{b:.3g}): ours skips computation whose results are never used (exact shortcuts, same outputs), "
                  "or the two steps are not the same work")
    write_outputs(args, rows, rounds=details, official=notes)
    return 0
