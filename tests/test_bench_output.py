"""``msa-fast bench … --json / --csv / --plot`` (shared by every suite) and the interleaved, paired timing of
``msa-fast bench ops``: tiny shapes, one repetition (``--smoke``), a few seconds in all."""
from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch

from msa_fast.bench import machine_info, plot_speedups, require_matplotlib, speedup_columns, write_outputs
from msa_fast.bench.ops import (PROVIDERS, RATIOS, TINY, _cases, make_case, paired_ratio, summarize,
                                time_interleaved)
from msa_fast.cli import build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---- pairing and interleaving -------------------------------------------------------------------------------------
def test_paired_ratio_pairs_repetitions_where_unpaired_medians_disagree():
    # repetition 1 hit cpp with a load spike, repetition 2 hit eager: each provider's median is spoiled, the
    # per-repetition ratios are not
    eager = [1.0, 2.0, 100.0]
    cpp = [0.5, 100.0, 50.0]
    assert paired_ratio(eager, cpp) == pytest.approx(2.0)
    assert statistics.median(eager) / statistics.median(cpp) == pytest.approx(0.04)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_summarize_columns_are_paired_medians_and_minima():
    times = {"eager": [4.0, 9.0, 30.0], "sdpa": [2.0, 3.0, 60.0], "cpp": [2.0, 30.0, 10.0], "auto": [1.0, 3.0, 10.0]}
    row = summarize(times, ("eager", "sdpa", "cpp", "auto"))
    assert row["eager_ms"] == 9.0 and row["cpp_ms"] == 10.0 and row["auto_min"] == 1.0 and row["sdpa_min"] == 2.0
    assert row["eager/cpp"] == pytest.approx(statistics.median([2.0, 0.3, 3.0]))  # 2.0; unpaired 9/10 = 0.9
    assert row["sdpa/cpp"] == pytest.approx(statistics.median([1.0, 0.1, 6.0]))
    assert row["eager/auto"] == pytest.approx(statistics.median([4.0, 3.0, 3.0]))
    assert row["sdpa/auto"] == pytest.approx(statistics.median([2.0, 1.0, 6.0]))
    assert list(row)[:4] == ["eager_ms", "sdpa_ms", "cpp_ms", "auto_ms"]
    # an op without SDPA: the column stays (one table), empty
    row = summarize({k: times[k] for k in ("eager", "cpp", "auto")}, ("eager", "sdpa", "cpp", "auto"))
    assert row["sdpa_ms"] is None and row["sdpa/cpp"] is None and row["eager/cpp"] == pytest.approx(2.0)
    # expert_mixture: "bmm" in the second place stands for sdpa in the ratios
    row = summarize({"eager": [2.0], "bmm": [1.0], "cpp": [1.0], "auto": [0.5]}, ("eager", "bmm", "cpp", "auto"))
    assert row["bmm/cpp"] == 1.0 and row["bmm/auto"] == 2.0 and "sdpa/cpp" not in row
    assert {f"{a}/{b}" for a, b in RATIOS} == {"eager/cpp", "sdpa/cpp", "eager/auto", "sdpa/auto"}


def test_time_interleaved_round_robin_with_rotating_start():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    times = time_interleaved(runs, repeat=4, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)


# ---- cases -----------------------------------------------------------------------------------------------------
def test_cases_cover_unmasked_and_head_dim_64_and_providers_table_matches_the_factory():
    shape, cases = _cases(full=False)
    assert shape == TINY
    for op in ("attention", "multi_source"):
        assert {(D, m) for o, D, _, m in cases if o == op} == {(D, m) for D in (16, 32, 64) for m in (True, False)}
    assert {m for o, _, _, m in cases if o == "bottleneck"} == {True, False}
    for op in {c[0] for c in cases}:
        D, K = next((D, K) for o, D, K, _ in cases if o == op)
        provs = make_case(op, TINY, D, K)["providers"]
        assert tuple(p for p in provs if p != "triton") == PROVIDERS[op], op
        assert "auto" in provs


def test_bench_ops_module_generates_only_existing_combinations():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ops.py"
    spec = importlib.util.spec_from_file_location("_bench_ops_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    combos = [p.values for p in mod.PARAMS]
    assert all(provider in PROVIDERS[op] for op, _, _, _, provider, _ in combos)
    assert ("attention", 64, 0, False, "auto", "fwd") in combos
    assert ("expert_mixture", 16, 4, True, "bmm", "fwd+bwd") in combos
    assert not any(op == "dropout" and provider == "sdpa" for op, _, _, _, provider, _ in combos)
    assert len({p.id for p in mod.PARAMS}) == len(combos)


# ---- --json / --csv / --plot ------------------------------------------------------------------------------------
def test_every_suite_has_the_output_flags():
    parser = build_parser()
    for suite in ("ops", "retrieval", "models", "scaling"):
        args = parser.parse_args(["bench", suite, "--json", "r.json", "--csv", "r.csv", "--plot", "r.png"])
        assert (args.json, args.csv, args.plot) == ("r.json", "r.csv", "r.png"), suite
        args = parser.parse_args(["bench", suite])
        assert (args.json, args.csv, args.plot) == (None, None, None), suite


def test_machine_info_fields():
    info = machine_info()
    assert info["cpu"] and info["cpu_count"] >= 1 and info["date"] and isinstance(info["argv"], list)
    assert set(info["versions"]) >= {"torch", "triton", "faiss"} and info["versions"]["torch"]
    assert info["load_avg"] is None or len(info["load_avg"]) == 3


@pytest.fixture
def ops_outputs(tmp_path, capsys):
    """One ``msa-fast bench ops --smoke`` run of the attention cases, forward only, with --json and --csv."""
    jpath, cpath = tmp_path / "ops.json", tmp_path / "ops.csv"
    rc = main(["bench", "ops", "--smoke", "--threads", "1", "--op", "attention", "--mode", "fwd",
               "--json", str(jpath), "--csv", str(cpath)])
    assert rc == 0
    return json.loads(jpath.read_text()), list(csv.DictReader(cpath.open())), capsys.readouterr().out


def test_ops_json_has_machine_info_and_the_printed_rows(ops_outputs):
    data, _, out = ops_outputs
    assert data["suite"] == "ops" and data["settings"]["repeat"] == 1 and data["settings"]["op"] == "attention"
    m = data["machine"]
    assert m["cpu"] and m["cpu_count"] >= 1 and m["torch_threads"] == 1 and m["argv"]
    assert data["command"][:3] == ["msa-fast", "bench", "ops"] and "--json" in data["command"]
    assert m["versions"]["torch"] and "faiss" in m["versions"] and "triton" in m["versions"]
    rows = data["rows"]
    assert [(r["op"], r["D"], r["masked"], r["mode"]) for r in rows] == \
        [("attention", D, masked, "fwd") for D in (16, 32, 64) for masked in (True, False)]
    for r in rows:
        for col in ("eager_ms", "sdpa_ms", "cpp_ms", "auto_ms", "eager/cpp", "sdpa/cpp", "eager/auto", "sdpa/auto",
                    "eager_min", "auto_min"):
            assert r[col] > 0, col
        # one repetition: the paired ratio is the ratio of that repetition's two calls
        assert r["eager/auto"] == pytest.approx(r["eager_ms"] / r["auto_ms"])
    assert data["roofline"] and all(r["op"] for r in data["roofline"])
    assert "auto_ms" in out and "eager/auto" in out and "load average" in out


def test_ops_csv_matches_json(ops_outputs):
    data, csv_rows, _ = ops_outputs
    assert len(csv_rows) == len(data["rows"])
    assert list(csv_rows[0]) == list(data["rows"][0])
    for c, j in zip(csv_rows, data["rows"]):
        assert c["op"] == j["op"] and int(c["D"]) == j["D"] and c["masked"] == str(j["masked"])
        assert float(c["eager/cpp"]) == pytest.approx(j["eager/cpp"])
        assert float(c["auto_ms"]) == pytest.approx(j["auto_ms"])


def test_write_outputs_any_suite_rows(tmp_path):
    import argparse

    rows = [{"model": "lnln", "backend": "auto", "mode": "train", "ms": 10.0, "speedup": 1.5},
            {"model": "lnln", "backend": "torch", "mode": "train", "ms": 15.0, "speedup": 1.0, "error": ""}]
    args = argparse.Namespace(suite="models", json=str(tmp_path / "m.json"), csv=str(tmp_path / "m.csv"), plot=None)
    write_outputs(args, rows)
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["rows"] == rows and data["suite"] == "models" and data["machine"]["cpu_count"] >= 1
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "model,backend,mode,ms,speedup,error"
    assert speedup_columns(rows) == ["speedup"]
    assert speedup_columns([{"op": "x", "eager/cpp": None, "note": "a/b"}]) == []


def test_plot_is_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "ops.png"
    assert main(["bench", "ops", "--smoke", "--threads", "1", "--op", "masked_mean", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC
    models = tmp_path / "models.png"
    rows = [{"model": m, "variant": "features", "backend": b, "mode": "forward", "ms": 1.0, "speedup": s}
            for m in ("lnln", "hme") for b, s in (("auto", 1.4), ("torch", 1.0))]
    assert plot_speedups(rows, str(models), title="models") == ["speedup"]
    assert models.read_bytes()[:8] == PNG_MAGIC


def test_plot_without_matplotlib_names_the_install(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        require_matplotlib()
    assert "pip install matplotlib" in str(exc.value) and "plot" in str(exc.value)
    png = tmp_path / "never.png"
    with pytest.raises(SystemExit) as exc:  # refused before the benchmark runs
        main(["bench", "ops", "--smoke", "--op", "dropout", "--plot", str(png)])
    assert "pip install matplotlib" in str(exc.value) and not png.exists()


def test_model_rows_count_flops_on_the_reference_and_compare_with_the_gemm_rate():
    import torch

    from msa_fast.bench.models import counted_gflop, gemm_gflops

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert counted_gflop(lambda: a @ b) == pytest.approx(2 * 64 * 32 * 16 / 1e9)
    q = torch.randn(1, 2, 8, 16)
    # a fused op is opaque to the counter: it is counted on the torch reference composition (QK^T and PV matmuls)
    from msa_fast.ops import attention

    assert counted_gflop(lambda: attention(q, q, q, backend="auto")) >= 2 * 2 * (2 * 8 * 8 * 16) / 1e9 * 0.99
    assert gemm_gflops(n=128, repeats=2) > 0


# ---- equal-work mode: the benchmark's step does the official step's work ---------------------------------------
def test_equal_work_lnln_runs_both_full_passes_on_the_complete_view_the_erasure_built():
    from msa_fast.models.registry import get_model_class

    fast, batch = get_model_class("lnln").bench_inputs(batch_size=4, use_text_features=True)
    equal, _ = get_model_class("lnln").bench_inputs(batch_size=4, use_text_features=True, work="equal")
    assert fast.config["share_complete_pass"] == "auto" and equal.config["share_complete_pass"] == "never"
    assert fast.config["kept_rows_only"] and not equal.config["kept_rows_only"]
    # features came with the synthetic split and went through the erasure: the complete view keeps them, the
    # incomplete view has the erased tokens' rows zeroed (the features variant once gave both views the same tensor)
    inc, full = batch.text_features, batch.complete.text_features
    assert full.abs().sum() > 0 and not torch.equal(inc, full)
    changed = (inc != full).any(-1)
    assert torch.all(inc[changed] == 0)


def test_equal_work_dashfusion_text_runs_to_the_padded_length():
    from msa_fast.models.registry import get_model_class

    _, fast = get_model_class("dashfusion").bench_inputs(batch_size=4)
    _, equal = get_model_class("dashfusion").bench_inputs(batch_size=4, work="equal")
    L = fast.text_ids.shape[1]
    assert int(fast.text_lengths.max()) < L and equal.text_lengths.tolist() == [L] * 4
    valid = fast.text_attention_mask.bool()
    assert torch.equal(equal.text_ids[valid], fast.text_ids[valid])
    assert int(equal.text_ids.max()) < 1000  # in the tiny BERT's vocabulary


def test_bench_step_is_the_trainers_update_with_its_clipping(monkeypatch):
    """HME's train row steps with the trainer's update: value clipping at 0.8 and the official no-decay groups."""
    import msa_fast.train.optim as optim
    from msa_fast.bench.models import build_case, time_case

    seen = []
    real = optim.OptimizerSet.clip_and_step

    def spy(self, model, cfg):
        seen.append((cfg.grad_clip_value, [g["weight_decay"] for g in self.main.param_groups]))
        return real(self, model, cfg)

    monkeypatch.setattr(optim.OptimizerSet, "clip_and_step", spy)
    model, batch = build_case("hme", "features", batch_size=2)
    time_case(model, batch, "train", repeats=1, warmup=0)
    assert seen and seen[0] == (0.8, [1e-4, 0.0])


def test_work_mode_is_checked():
    from msa_fast.models.registry import get_model_class

    with pytest.raises(ValueError, match="work must be one of"):
        get_model_class("hme").bench_inputs(batch_size=2, work="official")


def test_gemm_bound_says_how_far_any_same_flop_kernel_could_beat_eager():
    from msa_fast.bench.ops import gemm_bound

    row = {"eager_ms": 30.0, "auto_ms": 20.0}
    out = gemm_bound(2.0, 200.0, row)  # 2 GFLOP at 200 GFLOP/s: a 10 ms floor
    assert out["floor_ms"] == pytest.approx(10.0) and out["gemm_frac"] == pytest.approx(0.5)
    assert out["eager/floor"] == pytest.approx(3.0)
    assert gemm_bound(None, 200.0, row) == {} and gemm_bound(0.0, 200.0, row) == {}


def test_model_rows_peak_memory_excludes_the_flop_count():
    """The FLOP count runs the torch reference composition (DashFusion: materialised attention matrices, ~10 GB at
    B = 16): the row's peak RSS is read before it. Fresh process: a long test session's freed heap would hide
    the allocation from the RSS."""
    import subprocess
    import sys

    code = """
import torch
import msa_fast.bench.models as bm
from msa_fast.bench import peak_rss_mb

def greedy_count(call):
    x = torch.ones(96 * 2**20)  # 384 MB touched
    return float(x[0])

bm.counted_gflop = greedy_count
model, batch = bm.build_case("hme", "features", batch_size=2)
out = bm.time_case(model, batch, "forward", repeats=1, warmup=0)
assert out["gflop"] == 1.0, out
assert peak_rss_mb() - out["peak_rss_mb"] > 250, (peak_rss_mb(), out)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
