"""Ahead-of-time compile of every Triton kernel config for sm_80 (A100) and sm_90 (H100), no GPU needed.

Collects ``AOT_CONFIGS`` from every public module of ``msa_fast.kernels`` and asserts, per config and architecture:
it compiles (this also catches tl.dot dims < 16, which the interpreter accepts), 0 spill bytes in ``ptxas -v`` of the
ptxas Triton bundles (``get_ptxas(cap)``), dynamic shared memory within the chip limit (163 KB / 227 KB), and
registers within the config's occupancy budget.

Register budget (``aot.register_budget``; "registers <= 255" alone can never fail, ptxas caps there): sm_80 and sm_90
have 65 536 registers and 64 warp slots per SM, allocated per thread in units of 8. Each config declares
``min_warps_per_sm`` (default ``aot.DEFAULT_MIN_WARPS_PER_SM`` = 16, i.e. 25 % occupancy); its ceil(min_warps_per_sm /
num_warps) blocks must fit the register file, so registers <= min(255, floor(65536 / (blocks * num_warps * 32) / 8) * 8)
(= 128 at the default). A config that needs more must declare a lower occupancy in its AOT_CONFIGS entry.

Launch specialisations (``test_launch_specialisations_*``): Triton's JIT does not compile the generic signature
above but one specialised on the launch arguments (ints == 1 become constexprs, 16-divisible ints / pointers get a
divisibility attribute, ints >= 2**31 become i64). ``aot.collect_launch_specialisations()`` runs the public ops and
a DashFusion training step at MOSI shapes on CPU under TRITON_INTERPRET=1 with the kernel launches hooked (kernels
not executed), computes each launch's specialisation with Triton's own binder for the CUDA target (tensors seen with
CUDA's 512-byte allocation alignment), dedupes, and every distinct one is compiled and checked like the configs.

The compile runs once per session in a subprocess without TRITON_INTERPRET (see msa_fast/testing/aot.py for why).
``python -m msa_fast.testing.aot`` prints the same table.
"""
import inspect

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

from msa_fast.testing import aot  # noqa: E402

CAPABILITIES = (80, 90)
CONFIGS = aot.collect_aot_configs()
NAMES = [c["name"] for c in CONFIGS]
BY_NAME = {c["name"]: c for c in CONFIGS}


def test_config_names_unique_and_signatures_complete():
    assert CONFIGS, "no AOT_CONFIGS found in msa_fast.kernels"
    assert len(set(NAMES)) == len(NAMES), "AOT config names must be unique"
    for cfg in CONFIGS:
        fn = getattr(cfg["kernel"], "fn", cfg["kernel"])
        params = list(inspect.signature(fn).parameters)
        assert list(cfg["signature"]) == params, f"{cfg['name']}: signature must list every parameter in order"
        constexpr = {k for k, t in cfg["signature"].items() if t == "constexpr"}
        assert constexpr == set(cfg["constexprs"]), f"{cfg['name']}: constexpr values missing or extra"
        assert cfg["num_warps"] in (1, 2, 4, 8, 16) and cfg["num_stages"] >= 1


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'a' for 'sm_80'\n"
           "ptxas info    : Function properties for a\n"
           "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function 'b' for 'sm_80'\n"
           "ptxas info    : Function properties for b\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 40 registers, 380 bytes cmem[0]\n")
    assert aot.parse_ptxas_log(log, "a") == dict(registers=255, spill_stores=8, spill_loads=12, stack_frame=16)
    assert aot.parse_ptxas_log(log, "b") == dict(registers=40, spill_stores=0, spill_loads=0, stack_frame=0)
    with pytest.raises(RuntimeError):
        aot.parse_ptxas_log("nothing here")


@pytest.mark.parametrize("log, what", [
    ("ptxas info    : Compiling entry function 'a' for 'sm_80'\n"
     "ptxas info    : Used 40 registers, 380 bytes cmem[0]\n", "spill line"),
    ("ptxas info    : Compiling entry function 'a' for 'sm_80'\n"
     "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n", "register line"),
    ("ptxas info    : Compiling entry function 'other' for 'sm_80'\n"
     "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
     "ptxas info    : Used 40 registers\n", "no ptxas -v entry for a"),
])
def test_parse_ptxas_log_refuses_incomplete_logs(log, what):
    with pytest.raises(RuntimeError, match=what):
        aot.parse_ptxas_log(log, "a")


@pytest.fixture(scope="module")
def aot_rows():
    rows = aot.compile_all_subprocess(CAPABILITIES)
    print("\n" + "\n".join(aot.format_row(r) for r in rows))
    return {(r["name"], r["capability"]): r for r in rows}


@pytest.mark.aot
@pytest.mark.slow
@pytest.mark.parametrize("cap", CAPABILITIES)
@pytest.mark.parametrize("name", NAMES)
def test_config_compiles_without_spills_within_shared_memory(name, cap, aot_rows):
    row = aot_rows[(name, cap)]
    cfg = BY_NAME[name]
    problems = aot.check_resources(row, cfg["num_warps"], cfg.get("min_warps_per_sm", aot.DEFAULT_MIN_WARPS_PER_SM))
    assert not problems, f"{aot.format_row(row)}: {problems}"


def test_register_budget_rule():
    assert aot.register_budget(4) == aot.register_budget(8) == aot.register_budget(1) == 128  # 16 warps / SM
    assert aot.register_budget(8, 8) == aot.register_budget(4, 8) == 255  # one 8-warp block: the ISA cap
    assert aot.register_budget(4, 32) == 64 and aot.register_budget(8, 24) == 80  # 24 warps: 3 blocks of 8
    assert aot.register_budget(2, 12) == 168  # 6 blocks of 64 threads: 65536 / 384 = 170 -> 168 (units of 8)
    with pytest.raises(ValueError):
        aot.register_budget(0)


def test_resource_check_fails_on_made_up_results():
    ok = dict(name="x", capability=80, registers=128, spill_stores=0, spill_loads=0, stack_frame=0, shared=1024)
    assert aot.check_resources(ok, num_warps=8) == []
    over = dict(ok, registers=136)  # fits the ISA's 255, not the 16-warps/SM budget
    assert any("budget 128" in p for p in aot.check_resources(over, num_warps=8))
    assert aot.check_resources(over, num_warps=8, min_warps_per_sm=8) == []  # declared lower occupancy
    assert any("spills" in p for p in aot.check_resources(dict(ok, spill_loads=4), num_warps=4))
    assert any("shared" in p for p in aot.check_resources(dict(ok, shared=200 * 1024), num_warps=4))
    assert aot.check_resources(dict(ok, capability=90, shared=200 * 1024), num_warps=4) == []
    assert aot.check_resources(dict(name="x", capability=90, error="boom"), num_warps=4)


@pytest.fixture(scope="module")
def launch_rows():
    specs = aot.collect_launch_specialisations(CAPABILITIES)
    rows = aot.compile_specs_subprocess(specs)
    print(f"\n{len(specs)} distinct launch specialisations\n" + "\n".join(aot.format_row(r) for r in rows))
    return specs, rows


@pytest.mark.aot
@pytest.mark.slow
def test_launch_specialisations_compile_without_spills_within_budget(launch_rows):
    specs, rows = launch_rows
    assert len(rows) == len(specs)
    kernels = {s["kernel"] for s in specs}
    assert {f"msa_fast.kernels.attention:{k}" for k in ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel",
                                                         "_attn_bwd_dq_kernel")} <= kernels
    # the recording reflects the launches: single-source calls specialise S = 1, DashFusion was driven
    assert any(s["constexprs"].get("S") == 1 for s in specs)
    assert any(src.startswith("dashfusion") for s in specs for src in s["sources"])
    failures = []
    for spec, row in zip(specs, rows):
        cfg = aot.matching_aot_config(spec, CONFIGS)
        if cfg is None:
            failures.append(f"{spec['name']} sm_{spec['capability']}: no AOT_CONFIGS entry has its tiles "
                            f"{spec['constexprs']} / num_warps {spec['num_warps']}")
            continue
        problems = aot.check_resources(row, spec["num_warps"],
                                       cfg.get("min_warps_per_sm", aot.DEFAULT_MIN_WARPS_PER_SM))
        if problems:
            failures.append(f"{aot.format_row(row)}: {problems} (from e.g. {spec['sources'][0]})")
    assert not failures, "\n".join(failures)
