"""``msa-fast demo``: a short tour — synthesise data, inspect it, score baselines, benchmark the fused ops, train a model.

The demo is a list of sections (``SECTIONS``); each is a ``Section(title, run, requires)`` whose ``run(ctx)`` prints
its part and may store results in the shared ``ctx`` dict (``ctx["args"]``, ``ctx["data"]``, ...). A section whose
``requires`` modules cannot be imported is skipped with a note, so later sections (kernel benchmark table, short
training run) can be appended before their modules exist::

    SECTIONS.append(Section("kernel benchmark table", run_bench_section, requires=("msa_fast.bench.ops",)))
"""
from __future__ import annotations

import argparse
import importlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

__all__ = ["Section", "SECTIONS", "add_parser", "run_demo", "ridge_fit_predict", "pooled_features", "baseline_scores"]


@dataclass
class Section:
    title: str
    run: Callable[[dict], None]
    requires: tuple[str, ...] = field(default_factory=tuple)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``msa-fast demo``; the parser lives in the torch-free ``msa_fast.demo_args`` (what ``msa_fast.cli``
    uses, since this module imports torch)."""
    from .demo_args import add_parser as _add_parser

    _add_parser(sub)


# ---- sections ------------------------------------------------------------------------------------------
def section_synthesise(ctx: dict) -> None:
    from msa_fast.data import synthetic

    args = ctx["args"]
    sizes = None if args.full else ((256, 64, 128) if args.quick else (512, 128, 256))
    start = time.perf_counter()
    ctx["data"] = synthetic(args.dataset, *(sizes or (None, None, None)), seed=args.seed)
    n = "/".join(str(len(ctx["data"][s]["regression_labels"])) for s in ("train", "valid", "test"))
    print(f"synthetic {args.dataset} (train/valid/test {n}, seed {args.seed}) in {time.perf_counter() - start:.2f} s"
          " — labels mix a text, an audio and a vision latent, so only fusion can explain them")


def section_inspect(ctx: dict) -> None:
    from msa_fast.data import load_mmsa
    from msa_fast.data.cli import describe

    data, report = load_mmsa(ctx["data"], return_report=True)
    ctx["data"] = data
    print("\n".join(describe({"train": data["train"]}, {"train": report["train"]})))
    print(f"(valid {report['valid']['n']}, test {report['test']['n']} samples; all splits validated)")


def pooled_features(split: dict) -> dict[str, torch.Tensor]:
    """Masked-mean pooled features per modality (float64): text from ``text`` (or a bag of ids), audio, vision."""
    from msa_fast.data.batch import lengths_to_padding_mask
    from msa_fast.ops.masked_mean import masked_mean

    out = {}
    tb = torch.as_tensor(np.asarray(split["text_bert"]))
    text_valid = tb[:, 1] > 0
    if "text" in split:
        out["text"] = masked_mean(torch.from_numpy(split["text"]).double(), text_valid)
    else:  # bag of word ids (1000-word vocabulary), normalised by length
        ids = tb[:, 0].long().clamp(0, 999)
        bag = torch.zeros(ids.shape[0], 1000, dtype=torch.float64).scatter_add_(1, ids, text_valid.double())
        out["text"] = bag / text_valid.sum(1, keepdim=True).clamp(min=1)
    for m in ("audio", "vision"):
        x = torch.from_numpy(split[m]).double()
        valid = ~lengths_to_padding_mask(torch.as_tensor(split[f"{m}_lengths"]), x.shape[1])
        out[m] = masked_mean(x, valid)
    return out


def ridge_fit_predict(x_train: torch.Tensor, y_train: torch.Tensor, x_eval: list[torch.Tensor],
                      lam: float) -> list[torch.Tensor]:
    """Closed-form ridge regression on standardised features (intercept unpenalised); float64."""
    mu, sd = x_train.mean(0), x_train.std(0).clamp(min=1e-8)
    z = (x_train - mu) / sd
    y_mean = y_train.mean()
    n, d = z.shape
    if d > n:  # dual form: an (n, n) solve instead of (d, d)
        w = z.T @ torch.linalg.solve(z @ z.T + lam * torch.eye(n, dtype=z.dtype), y_train - y_mean)
    else:
        w = torch.linalg.solve(z.T @ z + lam * torch.eye(d, dtype=z.dtype), z.T @ (y_train - y_mean))
    return [((x - mu) / sd) @ w + y_mean for x in x_eval]


BASELINE_GROUPS = {"text": ("text",), "audio": ("audio",), "vision": ("vision",),
                   "fused (t+a+v)": ("text", "audio", "vision")}


def baseline_scores(data: dict, dataset: str = "mosi") -> dict[str, dict]:
    """Test metrics of a constant (train mean) predictor and of ridge regressions on masked-mean pooled features of
    each modality and of all three concatenated (lambda chosen on valid MAE). Keys: "constant", BASELINE_GROUPS;
    each value = compute_metrics(...) plus "n_features" and "lambda"."""
    from msa_fast.metrics import compute_metrics

    feats = {s: pooled_features(data[s]) for s in ("train", "valid", "test")}
    y = {s: torch.from_numpy(np.asarray(data[s]["regression_labels"], dtype=np.float64)) for s in feats}
    results = {"constant": {**compute_metrics(np.full(len(y["test"]), float(y["train"].mean())), y["test"].numpy(),
                                              dataset), "n_features": 0, "lambda": None}}
    for name, mods in BASELINE_GROUPS.items():
        x = {s: torch.cat([feats[s][m] for m in mods], dim=1) for s in feats}
        best = None
        for lam in (0.1, 1.0, 10.0, 100.0, 1000.0):
            pv, pt = ridge_fit_predict(x["train"], y["train"], [x["valid"], x["test"]], lam)
            mae = float((pv - y["valid"]).abs().mean())
            if best is None or mae < best[0]:
                best = (mae, lam, pt)
        results[name] = {**compute_metrics(best[2].numpy(), y["test"].numpy(), dataset),
                         "n_features": int(x["train"].shape[1]), "lambda": best[1]}
    return results


def section_baselines(ctx: dict) -> None:
    from msa_fast.bench import format_table

    args = ctx["args"]
    results = baseline_scores(ctx["data"], args.dataset)
    key = "Non0_acc_2" if args.dataset != "sims" else "Mult_acc_2"
    rows = [{"baseline": "constant (train mean)" if name == "constant" else f"ridge on {name}",
             "features": m["n_features"], "lambda": m["lambda"], **_pick(m, key)} for name, m in results.items()]
    print(format_table(rows))
    fused, singles = results["fused (t+a+v)"], [results[m] for m in ("text", "audio", "vision")]
    beats = all(fused["MAE"] < s["MAE"] and fused["Corr"] > s["Corr"] for s in singles)
    print(f"fused beats every single modality (MAE and Corr, test): {'yes' if beats else 'NO'}")
    ctx["baselines"] = results


def _pick(metrics: dict, key: str) -> dict:
    return {"MAE": metrics["MAE"], "Corr": metrics["Corr"], key: metrics[key]}


def section_kernel_bench(ctx: dict) -> None:
    from msa_fast.bench import format_table
    from msa_fast.bench.ops import run

    args = ctx["args"]
    rows = run(quick=not args.full)
    shapes = "MOSI" if args.full else "tiny (use `msa-fast bench ops --full` for MOSI shapes)"
    print(f"fused ops, CPU, {torch.get_num_threads()} threads, {shapes}; times in ms, ratios vs the eager composition")
    print(format_table(rows))


def section_training(ctx: dict) -> None:
    from msa_fast.train import short_training_run

    short_training_run(quick=not ctx["args"].full, seed=1111 + ctx["args"].seed)


SECTIONS: list[Section] = [
    Section("synthesise a dataset", section_synthesise),
    Section("inspect it", section_inspect),
    Section("trivial baselines (MMSA metrics, test split)", section_baselines, requires=("msa_fast.metrics",)),
    Section("kernel benchmark table", section_kernel_bench, requires=("msa_fast.bench.ops",)),
    Section("short training run", section_training, requires=("msa_fast.train",)),
]


def _missing_module(requires: tuple[str, ...]) -> str | None:
    for name in requires:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def run_demo(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    ctx: dict = {"args": args}
    start = time.perf_counter()
    for k, section in enumerate(SECTIONS, start=1):
        print(f"\n== {k}. {section.title} ==")
        missing = _missing_module(section.requires)
        if missing is not None:
            print(f"(skipped: module {missing} is not available)")
            continue
        section.run(ctx)
    print(f"\ndemo finished in {time.perf_counter() - start:.1f} s")
    return 0
