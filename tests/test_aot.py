"""Ahead-of-time compile of every Triton kernel config for sm_80 (A100) and sm_90 (H100), no GPU needed.

Collects ``AOT_CONFIGS`` from every public module of ``msa_fast.kernels`` and asserts, per config and architecture:
it compiles (this also catches tl.dot dims < 16, which the interpreter accepts), 0 spill bytes in ``ptxas -v`` of the
ptxas Triton bundles (``get_ptxas(cap)``), and dynamic shared memory within the chip limit (163 KB / 227 KB).

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
    assert row.get("error") is None, f"{name} failed to compile for sm_{cap}: {row['error']}"
    assert row["spill_stores"] == 0 and row["spill_loads"] == 0, aot.format_row(row)
    assert row["registers"] <= aot.MAX_REGISTERS, aot.format_row(row)
    assert row["shared"] <= aot.SHARED_LIMIT[cap], aot.format_row(row)
