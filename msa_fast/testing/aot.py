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
import contextlib
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
from typing import Any, Iterator, Optional, Sequence

# Opt-in dynamic shared memory per block (CUDA programming guide): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255  # per thread (ISA limit: ptxas never reports more, so it is no check by itself)

# Register budget (occupancy). sm_80 and sm_90 have 65 536 32-bit registers and 64 warp slots per SM; ptxas
# allocates per thread in units of 8 (256 per warp). Every config declares ``min_warps_per_sm``: the resident warps
# it needs to hide latency (default 16 = 25 % occupancy). Its blocks of num_warps·32 threads must then fit
# ceil(min_warps_per_sm / num_warps) times in the register file:
#     registers ≤ register_budget(num_warps, min_warps_per_sm)
#               = min(255, ⌊65 536 / (ceil(min_warps_per_sm / num_warps) · num_warps · 32) / 8⌋ · 8)
# (= 128 at the default for any num_warps ≤ 16). A config that needs more registers must say so by declaring a lower
# occupancy (e.g. 8 warps/SM: one 8-warp block, 255 registers), visible in its AOT_CONFIGS entry.
REGISTER_FILE = 65536
REGISTER_ALLOC_UNIT = 8
DEFAULT_MIN_WARPS_PER_SM = 16


def register_budget(num_warps: int, min_warps_per_sm: int = DEFAULT_MIN_WARPS_PER_SM) -> int:
    """Most registers per thread that still keep ``min_warps_per_sm`` warps resident (see the rule above)."""
    if num_warps < 1 or min_warps_per_sm < 1:
        raise ValueError("num_warps and min_warps_per_sm must be >= 1")
    blocks = -(-min_warps_per_sm // num_warps)
    per_thread = REGISTER_FILE // (blocks * num_warps * 32)
    return min(MAX_REGISTERS, per_thread // REGISTER_ALLOC_UNIT * REGISTER_ALLOC_UNIT)


def check_resources(row: dict, num_warps: int, min_warps_per_sm: int = DEFAULT_MIN_WARPS_PER_SM) -> list[str]:
    """Problems of one compiled row: compile error, spills, shared memory over the chip limit, registers over
    ``register_budget`` → list of messages (empty = fine)."""
    if row.get("error"):
        return [f"failed to compile: {row['error']}"]
    out = []
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']}/{row['spill_loads']} bytes")
    if row["shared"] > SHARED_LIMIT[row["capability"]]:
        out.append(f"shared memory {row['shared']} > {SHARED_LIMIT[row['capability']]}")
    budget = register_budget(num_warps, min_warps_per_sm)
    if row["registers"] > budget:
        out.append(f"{row['registers']} registers > budget {budget} (num_warps={num_warps}, "
                   f"min_warps_per_sm={min_warps_per_sm})")
    return out


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


_RESULT_FIELDS = {f.name for f in dataclasses.fields(AotResult)}
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


def resolve_kernel(kernel: Any) -> Any:
    """A kernel object, or one named ``"package.module:function"`` (how recorded launch specialisations name it)."""
    if isinstance(kernel, str):
        mod, _, attr = kernel.partition(":")
        return getattr(importlib.import_module(mod), attr)
    return kernel


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

    fn = _as_jit_function(resolve_kernel(config["kernel"]))
    name = config.get("name", fn.__name__)
    t0 = time.perf_counter()
    # attrs (launch specialisations): {parameter name: [["tt.divisibility", 16]]}, as Triton's JIT passes them
    attrs = {(fn.arg_names.index(k),): [list(a) for a in v] for k, v in config.get("attrs", {}).items()}
    src = ASTSource(fn=fn, signature=dict(config["signature"]), constexprs=dict(config.get("constexprs", {})),
                    attrs=attrs)
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


# ----------------------------------------------------------------------------------------------------------------
# Launch specialisations: what Triton's JIT compiles at the real launches, not the generic AOT_CONFIGS signature.
#
# At launch ``JITFunction.run`` binds the arguments with a binder made by ``create_function_from_signature`` (per
# argument ``native_specialize_impl``): an int equal to 1 becomes a constexpr (S = 1 in every single-source call),
# ints and pointers divisible by 16 get ``tt.divisibility = 16``, ints >= 2**31 become i64. ``_pack_args`` turns
# that into (signature, constexprs, attrs). ``launch_specialisation`` runs exactly those two Triton functions on the
# recorded arguments with the CUDA backend of the target, so nothing of the rule is re-implemented here.
#
# Pointer alignment: on CPU a tensor's data_ptr is whatever the CPU allocator gave. On CUDA the caching allocator
# hands out 512-byte aligned blocks, so a tensor's data_ptr % 16 is (storage_offset * element_size) % 16. The
# recorder passes Triton a stand-in whose data_ptr() is a 512-aligned base plus that byte offset: views with an
# offset keep their (mis)alignment, fresh tensors are 16-divisible as on the GPU. (A storage that is itself a slice
# of a bigger allocation - e.g. the caching allocator's block splitting - is still 512-aligned: blocks are rounded
# up to 512 bytes.)
# ----------------------------------------------------------------------------------------------------------------
CUDA_ALLOC_ALIGN = 512
_CUDA_BASE = 1 << 32  # any multiple of CUDA_ALLOC_ALIGN


class CudaLikeTensor:
    """What Triton's specialiser reads of a tensor (``dtype``, ``data_ptr()``), with CUDA's base alignment."""

    __slots__ = ("dtype", "_ptr")

    def __init__(self, t: Any):
        self.dtype = t.dtype
        self._ptr = _CUDA_BASE + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr


_BINDERS: dict = {}


def _binder(kernel: Any, capability: int):
    """(JITFunction, CUDA backend, Triton's own argument binder) for ``kernel`` on ``sm_<capability>``."""
    key = (id(kernel), capability)
    if key not in _BINDERS:
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature

        # an InterpretedFunction keeps the @triton.jit keywords (do_not_specialize, ...) in .kwargs
        jf = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **getattr(kernel, "kwargs", {}))
        backend = make_backend(GPUTarget("cuda", capability, 32))
        _BINDERS[key] = (kernel, jf, backend, create_function_from_signature(jf.signature, jf.params, backend))
    return _BINDERS[key][1:]


def kernel_qualname(kernel: Any) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__}:{fn.__name__}"


def launch_specialisation(kernel: Any, args: Sequence[Any], kwargs: dict, capability: int) -> dict:
    """The (signature, constexprs, attrs, num_warps, num_stages) Triton's JIT compiles for ``kernel[grid](*args,
    **kwargs)`` on ``sm_<capability>``, computed by Triton's binder and ``JITFunction._pack_args``; tensors are
    seen with CUDA's allocation alignment (``CudaLikeTensor``). Keys are parameter names (JSON-ready)."""
    import torch

    jf, backend, binder = _binder(kernel, capability)
    wrap = lambda a: CudaLikeTensor(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    args = [wrap(a) for a in args]
    kwargs = {k: wrap(v) for k, v in kwargs.items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jf._pack_args(backend, kwargs, bound, specialization, options)
    names = jf.arg_names
    return dict(kernel=kernel_qualname(kernel), capability=capability, signature=dict(signature),
                constexprs={names[p[0]]: v for p, v in constexprs.items()},
                attrs={names[p[0]]: v for p, v in attrs.items() if v},
                num_warps=options.num_warps, num_stages=options.num_stages)


def spec_key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in ("kernel", "capability", "signature", "constexprs", "attrs",
                                            "num_warps", "num_stages")}, sort_keys=True)


@contextlib.contextmanager
def record_launches(capabilities: Sequence[int] = (80, 90), execute: bool = False) -> Iterator[list[dict]]:
    """Within the block every ``kernel[grid](...)`` launch (interpreter mode) appends its launch specialisation for
    each capability to the yielded list; ``execute=False`` skips running the kernel (outputs stay uninitialised),
    so MSA-sized shapes cost nothing. The launchers are untouched: the hook is ``InterpretedFunction.run``."""
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("record_launches needs TRITON_INTERPRET=1 (use collect_launch_specialisations())")
    records: list[dict] = []
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if not warmup:
            for cap in capabilities:
                records.append(launch_specialisation(self, args, kwargs, cap))
        if execute:
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield records
    finally:
        InterpretedFunction.run = orig


# MOSI (the MSA benchmark the kernels are sized for): batch 32, 8 heads, text 50 tokens, audio 376 / vision 501
# frames; head dims 16 / 32 / 64.
MOSI = dict(B=32, H=8, text=50, audio=376, vision=501)
HEAD_DIMS = (16, 32, 64)


def _attention_scenarios():
    """(label, thunk) pairs calling the public ops (forward + backward) on CPU tensors at MOSI shapes."""
    import torch

    from msa_fast.ops import attention, multi_source_attention

    B, H = MOSI["B"], MOSI["H"]
    lens = {n: MOSI[n] for n in ("text", "audio", "vision")}

    def pad(L):  # ragged lengths: the last quarter of the batch keeps only half its frames
        m = torch.zeros(B, L, dtype=torch.bool)
        m[3 * B // 4:, L // 2:] = True
        return m

    def run_single(Lq, Lk, D, dtype, masked, p):
        q = torch.zeros(B, H, Lq, D, dtype=dtype, requires_grad=True)
        k = torch.zeros(B, H, Lk, D, dtype=dtype, requires_grad=True)
        v = torch.zeros(B, H, Lk, D, dtype=dtype, requires_grad=True)
        out = attention(q, k, v, key_padding_mask=pad(Lk) if masked else None,
                        query_padding_mask=pad(Lq) if masked else None, dropout_p=p)
        out.backward(torch.zeros_like(out))

    def run_multi(Lq, srcs, D, dtype, masked):
        q = torch.zeros(B, H, Lq, D, dtype=dtype, requires_grad=True)
        sources = [(torch.zeros(B, H, L, D, dtype=dtype, requires_grad=True),
                    torch.zeros(B, H, L, D, dtype=dtype, requires_grad=True), pad(L) if masked else None)
                   for L in srcs]
        out = multi_source_attention(q, sources, query_padding_mask=pad(Lq) if masked else None)
        out.backward(torch.zeros_like(out))

    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dn = str(dtype).replace("torch.", "")
        for D in HEAD_DIMS:
            for qn, Lq in lens.items():
                for kn, Lk in lens.items():
                    for masked in (False, True):
                        for p in (0.0, 0.1):
                            out.append((f"attention {dn} D{D} {qn}->{kn} masked={masked} p={p}",
                                        lambda a=(Lq, Lk, D, dtype, masked, p): run_single(*a)))
                # cross-modal alignment / Multi_CA: one query set over the other two modalities, and over all three
                others = [L for n, L in lens.items() if n != qn]
                for srcs in (others, list(lens.values())):
                    for masked in (False, True):
                        out.append((f"multi_source {dn} D{D} {qn}->{len(srcs)} sources masked={masked}",
                                    lambda a=(Lq, srcs, D, dtype, masked): run_multi(*a)))
    return out


def _dashfusion_scenarios():
    """DashFusion training steps at MOSI shapes (frame encoders with dropout, temporal alignment, HBF)."""
    import torch

    from msa_fast.data.batch import Batch
    from msa_fast.models import build
    from msa_fast.nn.text_encoder import TINY_BERT_CONFIG

    def step(masked_text: bool):
        torch.manual_seed(0)
        model = build("dashfusion", dataset="mosi", bert=TINY_BERT_CONFIG)
        model.train()
        c = model.config
        B, Lt = MOSI["B"], MOSI["text"]
        am = torch.ones(B, Lt, dtype=torch.long)
        if masked_text:
            am[B // 2:, Lt // 2:] = 0
        batch = Batch(text_ids=torch.ones(B, Lt, dtype=torch.long), text_attention_mask=am,
                      text_segment_ids=torch.zeros(B, Lt, dtype=torch.long),
                      audio=torch.zeros(B, c["audio_len"], c["audio_dim"]),
                      vision=torch.zeros(B, c["vision_len"], c["vision_dim"]),
                      audio_lengths=torch.full((B,), c["audio_len"]).long().clamp(max=c["audio_len"]) // 2 + 1,
                      vision_lengths=torch.full((B,), c["vision_len"]).long() // 2 + 1,
                      labels=torch.zeros(B), index=torch.arange(B), ids=[str(i) for i in range(B)],
                      raw_text=[""] * B)
        out = model(batch)
        loss = model.loss(batch, out)
        loss = loss["loss"] if isinstance(loss, dict) else loss
        loss.backward()

    return [(f"dashfusion mosi train step masked_text={m}", lambda m=m: step(m)) for m in (False, True)]


def launch_scenarios() -> list:
    return _attention_scenarios() + _dashfusion_scenarios()


def record_specialisations(capabilities: Sequence[int] = (80, 90)) -> list[dict]:
    """Run every scenario with ``backend="triton"`` under ``record_launches`` (this process must be in interpreter
    mode) → distinct specialisations, each with ``sources`` (scenario labels) and a unique ``name``."""
    from msa_fast.ops import use_backend

    distinct: dict[str, dict] = {}
    for label, thunk in launch_scenarios():
        with use_backend("triton"), record_launches(capabilities) as recs:
            thunk()
        for r in recs:
            d = distinct.setdefault(spec_key(r), dict(r, sources=[]))
            if label not in d["sources"]:
                d["sources"].append(label)
    specs = sorted(distinct.values(), key=lambda r: (r["kernel"], r["capability"], spec_key(r)))
    for i, r in enumerate(specs):
        fn = r["kernel"].split(":")[-1].strip("_")
        ptr = next((t for t in r["signature"].values() if t.startswith("*") and t != "*u8"), "")
        c = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
        r["name"] = f"launch.{fn}.{ptr[1:]}.w{r['num_warps']}[{c}].{i}"
    return specs


def collect_launch_specialisations(capabilities: Sequence[int] = (80, 90), timeout: float = 1800.0) -> list[dict]:
    """``record_specialisations`` in a fresh interpreter-mode subprocess (from any process) → list of specs, ready
    for ``compile_config`` (keys kernel, signature, constexprs, attrs, num_warps, num_stages, capability, name)."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "specs.json")
        cmd = [sys.executable, "-m", "msa_fast.testing.aot", "--record", out, "--capabilities", *map(str, capabilities)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"recording subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def matching_aot_config(spec: dict, configs: Sequence[dict]) -> Optional[dict]:
    """The ``AOT_CONFIGS`` entry a launch specialisation instantiates: same kernel, num_warps, num_stages and the
    same values of the config's own constexprs (tiles, flags; the launch adds specialised ints such as S = 1) and
    of its pointer types (fp16 launches may take the tiles of a bf16 entry: then any entry with those tiles)."""
    def same_tiles(c):
        return (kernel_qualname(c["kernel"]) == spec["kernel"] and c["num_warps"] == spec["num_warps"]
                and c["num_stages"] == spec["num_stages"]
                and all(spec["constexprs"].get(k) == v for k, v in c.get("constexprs", {}).items()))
    tiles = [c for c in configs if same_tiles(c)]
    ptrs = {k: v for k, v in spec["signature"].items() if v.startswith("*")}
    exact = [c for c in tiles if all(c["signature"].get(k) == v for k, v in ptrs.items())]
    return (exact or tiles or [None])[0]


def compile_specs(specs: Sequence[dict]) -> list[dict]:
    """Compile each spec for its own capability in this process → rows as ``compile_all``'s."""
    rows = []
    for spec in specs:
        try:
            r = compile_config(spec, spec["capability"])
            rows.append(dict(dataclasses.asdict(r), error=None, num_warps=spec["num_warps"]))
        except Exception as e:  # noqa: BLE001 - reported per spec by the caller
            rows.append(dict(name=spec["name"], capability=spec["capability"], num_warps=spec["num_warps"],
                             error=f"{type(e).__name__}: {e}"[-4000:]))
    return rows


def compile_specs_subprocess(specs: Sequence[dict], timeout: float = 3600.0) -> list[dict]:
    """``compile_specs`` in a fresh process without TRITON_INTERPRET (MSA_FAST_AOT_CACHE_DIR as in
    ``compile_all_subprocess``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if os.environ.get("MSA_FAST_AOT_CACHE_DIR"):
        env["TRITON_CACHE_DIR"] = os.environ["MSA_FAST_AOT_CACHE_DIR"]
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "specs.json"), os.path.join(tmp, "rows.json")
        with open(inp, "w") as f:
            json.dump(list(specs), f)
        cmd = [sys.executable, "-m", "msa_fast.testing.aot", "--specs", inp, "--json", out]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"AOT subprocess failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def format_row(row: dict) -> str:
    if row.get("error"):
        return f"{row['name']:<44s} sm_{row['capability']} ERROR {row['error'].splitlines()[-1][:200]}"
    return AotResult(**{k: v for k, v in row.items() if k in _RESULT_FIELDS}).row()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """python -m msa_fast.testing.aot [--json FILE]: compile all configs, print the resource table."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--package", default="msa_fast.kernels")
    ap.add_argument("--capabilities", nargs="+", type=int, default=[80, 90])
    ap.add_argument("--record", metavar="FILE", help="record the launch specialisations (needs TRITON_INTERPRET=1) "
                                                     "into FILE and exit")
    ap.add_argument("--specs", metavar="FILE", help="compile the specialisations recorded in FILE instead")
    args = ap.parse_args(argv)
    if args.record:
        specs = record_specialisations(args.capabilities)
        with open(args.record, "w") as f:
            json.dump(specs, f)
        print(f"{len(specs)} distinct launch specialisations", flush=True)
        return
    if args.specs:
        with open(args.specs) as f:
            rows = compile_specs(json.load(f))
    else:
        rows = compile_all(args.capabilities, args.package)
    for row in rows:
        print(format_row(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()
