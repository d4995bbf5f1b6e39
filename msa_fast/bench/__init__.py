"""msa-fast bench {ops,retrieval,models,scaling,official}: micro-benchmarks with ratios against the PyTorch reference
(and, ``official``, against a user's checkout of the official code, side by side).

Each suite lives in its own module (``ops.py``, ``retrieval.py``, ``models.py``) exposing
``add_arguments(parser)`` and ``main(args) -> int`` (rows printed as a table); the same setup factories
are reused by the pytest-benchmark suites in ``benchmarks/``. The suite modules import torch only inside their
functions, so that ``msa-fast bench SUITE --help`` answers at once; the module docstring is the suite's help (first
paragraph) and description (whole, as plain text).
"""
from __future__ import annotations

import argparse
import importlib
import os
import resource

SUITES = ("ops", "retrieval", "models", "scaling", "official")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..cli import doc_description, first_paragraph

    p = sub.add_parser("bench", help="run micro-benchmarks (ops | retrieval | models | scaling | official)",
                       description="Micro-benchmarks of msa_fast against the PyTorch reference: the fused ops "
                                   "(ops), memory-bank search and partner / in-batch retrieval (retrieval), and "
                                   "whole models, forward and training step (models), data-parallel training on 1 vs N processes (scaling), "
                                   "the official code's training step side by side with ours (official). Timings on a shared machine "
                                   "are noisy: compare ratios.")
    suites = p.add_subparsers(dest="suite", metavar="SUITE", title="suites")
    suites.required = True
    for name in SUITES:
        try:
            mod = importlib.import_module(f"msa_fast.bench.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"msa_fast.bench.{name}":
                continue
            raise
        sp = suites.add_parser(name, help=first_paragraph(mod.__doc__, name), description=doc_description(mod.__doc__),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        add_output_arguments(sp)
        sp.add_argument("--smoke", action="store_true",
                        help="smallest sizes and one repetition, only to check the suite runs (also MSA_FAST_SMOKE=1)")
        sp.set_defaults(func=_suite_main, suite_module=mod.__name__)


def _suite_main(args: argparse.Namespace) -> int:
    """Run a suite; under ``--smoke`` its module's ``SMOKE`` settings replace the parsed ones first."""
    from ..cli import smoke_requested

    mod = importlib.import_module(args.suite_module)
    if getattr(args, "plot", None):
        require_matplotlib()  # fail before the benchmark runs, not after
    if smoke_requested(args):
        for name, value in getattr(mod, "SMOKE", {}).items():
            setattr(args, name, value)
    return mod.main(args)


def format_table(rows: list[dict]) -> str:
    """Plain fixed-width table of dict rows (same keys), for terminals and the README."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


# ------------------------------------------------------------------------------------------------ shared output
#: Columns whose numeric values are speed-ups (> 1: the fused / msa_fast path is faster): ``a/b`` ratios and these.
SPEEDUP_COLUMNS = ("speedup",)
#: Columns never used as row labels in the plot (long free text).
_UNLABELLED = ("note", "error")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--json FILE`` / ``--csv FILE`` / ``--plot FILE.png`` of every suite (written by :func:`write_outputs`)."""
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the rows and the machine info (CPU, cores, threads, load, versions) as JSON")
    parser.add_argument("--csv", default=None, metavar="FILE", help="also write the rows as CSV")
    parser.add_argument("--plot", default=None, metavar="FILE.png",
                        help="also draw a speed-up bar chart per op / model from the ratio columns "
                             "(needs matplotlib: pip install matplotlib, or the 'plot' extra)")


def machine_info() -> dict:
    """CPU model, cores, threads, load average, library versions, date and argv (for result files)."""
    import datetime
    import os
    import platform
    import sys

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": list(sys.argv), "host": platform.node(), "platform": platform.platform(),
            "python": platform.python_version(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}}
    versions = {}
    for name in ("torch", "triton", "faiss", "numpy", "msa_fast"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - absent or broken optional library: recorded as None
                mod = None
        versions[name] = getattr(mod, "__version__", None) if mod is not None else None
    info["versions"] = versions
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def write_outputs(args: argparse.Namespace, rows: list[dict], **extra) -> None:
    """Write ``rows`` where ``--json`` / ``--csv`` / ``--plot`` ask (no-op without them); ``extra`` goes into the
    JSON next to ``rows`` and ``machine`` (e.g. other tables)."""
    suite = getattr(args, "suite", None)
    if getattr(args, "json", None):
        import json

        settings = {k: v for k, v in vars(args).items() if k not in ("func", "suite_module")
                    and isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
        command = ["msa-fast", *args.argv] if isinstance(getattr(args, "argv", None), list) else None
        with open(args.json, "w") as f:
            json.dump({"suite": suite, "command": command, "machine": machine_info(), "settings": settings,
                       "rows": rows, **extra}, f, indent=1, default=str)
    if getattr(args, "csv", None):
        write_csv(rows, args.csv)
    if getattr(args, "plot", None):
        plot_speedups(rows, args.plot, title=f"msa-fast bench {suite}" if suite else None)


def write_csv(rows: list[dict], path: str) -> None:
    import csv

    cols: list[str] = []
    for r in rows:  # union of the keys, first-seen order (suites may mix row shapes)
        cols += [k for k in r if k not in cols]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r.get(k) for k in cols})


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def speedup_columns(rows: list[dict]) -> list[str]:
    """The ratio columns of ``rows``: names with ``/`` (``eager/cpp``) or in SPEEDUP_COLUMNS, with a number
    somewhere."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and ("/" in k or k in SPEEDUP_COLUMNS)]
    return [c for c in cols if any(_is_number(r.get(c)) for r in rows)]


PLOT_MISSING = "--plot needs matplotlib: pip install matplotlib (or the 'plot' extra: pip install 'msa_fast[plot]')"


def require_matplotlib() -> None:
    """SystemExit naming ``pip install matplotlib`` / the ``plot`` extra when matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(PLOT_MISSING)


def plot_speedups(rows: list[dict], path: str, title: str | None = None) -> list[str]:
    """One horizontal grouped bar chart per op / model (the rows' first column) of the ratio columns, a
    line at 1 (``a/b`` > 1: b is faster; ``speedup`` > 1: the row's method is faster). → the ratio columns drawn.
    matplotlib is imported here only (optional extra ``plot``)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = speedup_columns(rows)
    if not rows or not ratios:
        raise SystemExit(f"--plot: no speed-up / ratio column in these rows ({', '.join(rows[0]) if rows else '-'})")
    key = next(iter(rows[0]))
    groups: dict = {}
    for r in rows:
        if any(_is_number(r.get(c)) for c in ratios):
            groups.setdefault(r.get(key), []).append(r)
    label_cols = [k for k in rows[0] if k != key and k not in ratios and k not in _UNLABELLED
                  and not any(isinstance(r.get(k), float) for r in rows)]

    def label(r):
        parts = []
        for k in label_cols:
            v = r.get(k)
            if v in (None, ""):
                continue
            parts.append(f"{k}={v}" if _is_number(v) or isinstance(v, bool) else str(v))
        return " ".join(parts)

    panels = []  # (name, rows, ratio columns with a number in these rows, height in inches)
    for name, g in groups.items():
        cols = [c for c in ratios if any(_is_number(r.get(c)) for r in g)]
        panels.append((name, g, cols, 1.3 + 0.15 * len(g) * len(cols)))
    ncols = 2 if len(panels) > 1 else 1
    columns: list[list] = [[] for _ in range(ncols)]
    for panel in sorted(panels, key=lambda p: -p[3]):  # tallest first, into the shorter column
        min(columns, key=lambda c: sum(p[3] for p in c)).append(panel)
    for column in columns:
        column.sort(key=lambda p: list(groups).index(p[0]))
    fig = plt.figure(figsize=(7.5 * ncols, max(sum(p[3] for p in c) for c in columns) + 0.6), layout="constrained")
    subfigs = fig.subfigures(1, ncols, squeeze=False)[0] if ncols > 1 else [fig]
    for sf, column in zip(subfigs, columns):
        axes = sf.subplots(len(column), 1, squeeze=False, gridspec_kw={"height_ratios": [p[3] for p in column]})
        for ax, (name, g, cols, _) in zip(axes[:, 0], column):
            bar = 0.8 / len(cols)
            for j, c in enumerate(cols):
                ys = [i + (j - (len(cols) - 1) / 2) * bar for i in range(len(g))]
                ax.barh(ys, [r.get(c) if _is_number(r.get(c)) else 0.0 for r in g], height=bar, label=c)
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_yticks(range(len(g)), [label(r) for r in g], fontsize=7)
            ax.tick_params(axis="x", labelsize=7)
            ax.invert_yaxis()
            ax.set_title(f"{key} = {name}", fontsize=9)
            ax.legend(fontsize=6, loc="best")
        axes[-1, 0].set_xlabel("speed-up (a/b > 1: b faster; speedup > 1: this row faster)", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ratios


def rss_mb() -> float:
    """This process's resident set size now (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS (MB): ``VmHWM`` of /proc/self/status where it exists, else ``ru_maxrss``.

    Not ``ru_maxrss`` first: on Linux it survives fork + exec, so a subprocess started by a process that holds
    1 GB reports at least 1 GB whatever it does itself; ``VmHWM`` belongs to the address space the exec created."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
