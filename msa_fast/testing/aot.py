"""Ahead-of-time Triton compilation for sm_80 / sm_90 without a GPU, with register / spill / shared-memory report.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` never touches a driver; the resulting PTX is
assembled again with the ptxas Triton itself would use (``get_ptxas(cap)``) and ``-v`` to read registers and spill
bytes. ``metadata.shared`` is the dynamic shared memory the launch will request.

Usage::

    from msa_fast.testing.aot import collect_aot_configs, compile_config
    for cfg in collect_aot_configs():          # in a process without TRITON_INTERPRET=1
        r = compile_config(cfg, 90)
        assert r.spill_bytes == 0 and r.shared <= r.shared_limit
    rows = compile_all_subprocess()            # from anywhere: same, in a fresh subprocess → list of dicts

Interpreter mode: kernels decorated under ``TRITON_INTERPRET=1`` are ``InterpretedFunction``s. Re-wrapping them as
``JITFunction(kernel.fn)`` is not enough on triton 3.7.1 (measured: parts of the front end check the interpreter knob,
e.g. constexpr functions return raw values; even with the knob switched off only the first compile of the process
succeeds). So a test session running the interpreter compiles in a fresh subprocess without the variable:
``compile_all_subprocess()`` (runs ``python -m msa_fast.testing.aot --json FILE``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

# Opt-in dynamic shared memory per block (CUDA programming guide): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255


@dataclasses.dataclass(frozen=True)
class AotResult:
    name: str
    capability: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    shared: int
    compile_s: float

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def shared_limit(self) -> int:
        return SHARED_LIMIT[self.capability]

    def row(self) -> str:
        return (f"{self.name:<40s} sm_{self.capability} regs={self.registers:3d} spill={self.spill_stores}/"
                f"{self.spill_loads} stack={self.stack_frame} smem={self.shared} ({self.compile_s:.1f}s)")


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str, kernel_name: Optional[str] = None) -> dict[str, int]:
    """Parse ``ptxas -v`` output → dict(registers, spill_stores, spill_loads, stack_frame).

    With several functions in one log, values are taken for ``kernel_name`` when given, else the maxima. Every
    function read must report both its register line and its spill line, and a named kernel must be in the log:
    a log missing either raises (a silent 0 would pass the spill check without evidence)."""
    blocks = [b for b in re.split(r"(?=ptxas info\s*: Compiling entry function)", log) if "Compiling entry" in b]
    chosen = [b for b in blocks if kernel_name is None or f"'{kernel_name}'" in b]
    if not chosen:
        raise RuntimeError(f"no ptxas -v entry for {kernel_name or 'any function'} in the log:\n{log}")
    res = dict(registers=0, spill_stores=0, spill_loads=0, stack_frame=0)
    for blk in chosen:
        used, spill = _PTXAS_USED.search(blk), _PTXAS_SPILL.search(blk)
        if used is None or spill is None:
            missing = " and ".join(n for n, m in (("register", used), ("spill", spill)) if m is None)
            raise RuntimeError(f"ptxas -v log without its {missing} line:\n{blk}")
        res["registers"] = max(res["registers"], int(used.group(1)))
        res["stack_frame"] = max(res["stack_frame"], int(spill.group(1)))
        res["spill_stores"] = max(res["spill_stores"], int(spill.group(2)))
        res["spill_loads"] = max(res["spill_loads"], int(spill.group(3)))
    return res


def _as_jit_function(kernel: Any):
    """JITFunction for ``kernel``; refuses interpreter mode (see module docstring)."""
    import triton
    from triton.runtime.jit import JITFunction

    if triton.knobs.runtime.interpret:
        raise RuntimeError("AOT compilation is unreliable in a TRITON_INTERPRET=1 process (triton 3.7.1: the first "
                           "compile works, later ones fail in the front end); use compile_all_subprocess()")
    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is None:
        raise TypeError(f"expected a @triton.jit kernel, got {type(kernel).__name__}")
    return JITFunction(fn)


def ptxas_arch(capability: int) -> str:
    return "sm_90a" if capability >= 90 else f"sm_{capability}"  # Triton targets sm_90a on Hopper


def compile_config(config: dict, capability: int, workdir: Optional[str] = None) -> AotResult:
    """Compile one ``AOT_CONFIGS`` entry for ``capability`` (80 or 90) and measure its resources.

    ``config`` keys: kernel, signature, constexprs, num_warps, num_stages, and optionally name.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    fn = _as_jit_function(config["kernel"])
    name = config.get("name", fn.__name__)
    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature=dict(config["signature"]), constexprs=dict(config.get("constexprs", {})))
    # Under TRITON_INTERPRET=1 parts of the front end (constexpr functions) skip constexpr wrapping; switch the
    # knob off for the duration of the compile so an interpreter test session can AOT-compile too.
    ck = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                        options={"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    compile_s = time.perf_counter() - t0
    ptx = ck.asm["ptx"]
    kernel_name = ck.metadata.name
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        ptxas = get_ptxas(capability).path
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={ptxas_arch(capability)}", ptx_path, "-o",
                               os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name} on sm_{capability}:\n{proc.stderr}")
    res = parse_ptxas_log(proc.stdout + proc.stderr, kernel_name)
    return AotResult(name=name, capability=capability, shared=int(ck.metadata.shared), compile_s=compile_s, **res)


def collect_aot_configs(package: str = "msa_fast.kernels") -> list[dict]:
    """Every ``AOT_CONFIGS`` entry of every public module in ``package`` (each gets a unique ``name``)."""
    pkg = importlib.import_module(package)
    configs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{package}.{info.name}")
        for i, cfg in enumerate(getattr(mod, "AOT_CONFIGS", [])):
            cfg = dict(cfg)
            kname = getattr(getattr(cfg["kernel"], "fn", cfg["kernel"]), "__name__", "kernel")
            cfg.setdefault("name", f"{info.name}.{kname}.{i}")
            configs.append(cfg)
    return configs


def compile_all(capabilities: Sequence[int] = (80, 90), package: str = "msa_fast.kernels") -> list[dict]:
    """Compile every collected config for every capability in this process → rows (dicts); errors are recorded
    in the row's ``error`` field instead of raised, so one bad config does not hide the others."""
    rows = []
    for cfg in collect_aot_configs(package):
        for cap in capabilities:
            try:
                rows.append(dict(dataclasses.asdict(compile_config(cfg, cap)), error=None))
            except Exception as e:  # noqa: BLE001 - reported per config by the caller
                rows.append(dict(name=cfg["name"], capability=cap, error=f"{type(e).__name__}: {e}"[-4000:]))
    return rows


def compile_all_subprocess(capabilities: Sequence[int] = (80, 90), package: str = "msa_fast.kernels",
                           timeout: float = 1800.0) -> list[dict]:
    """``compile_all`` in a fresh interpreter with TRITON_INTERPRET unset (safe from interpreter test sessions).

    Set MSA_FAST_AOT_CACHE_DIR to keep Triton's cache between runs (a cached config compiles in ~0 s; ptxas -v
    still runs on its PTX)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get("MSA_FAST_AOT_CACHE_DIR"):  # persistent Triton cache for reruns (keys include source+target)
        env["TRITON_CACHE_DIR"] = os.environ["MSA_FAST_AOT_CACHE_DIR"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "aot.json")
        cmd = [sys.executable, "-m", "msa_fast.testing.aot", "--json", out, "--package", package,
               "--capabilities", *map(str, capabilities)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def format_row(row: dict) -> str:
    if row.get("error"):
        return f"{row['name']:<44s} sm_{row['capability']} ERROR {row['error'].splitlines()[-1][:200]}"
    return AotResult(**{k: v for k, v in row.items() if k != "error"}).row()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """python -m msa_fast.testing.aot [--json FILE]: compile all configs, print the resource table."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--package", default="msa_fast.kernels")
    ap.add_argument("--capabilities", nargs="+", type=int, default=[80, 90])
    args = ap.parse_args(argv)
    rows = compile_all(args.capabilities, args.package)
    for row in rows:
        print(format_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
