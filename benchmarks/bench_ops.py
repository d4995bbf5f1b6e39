"""pytest-benchmark suite for the fused CPU ops: cpp and auto (``backend="auto"``, what the models run) vs the eager
composition vs torch SDPA (expert_mixture: vs one batched torch.bmm composition, provider "bmm").

Tiny shapes by default (CI runs ``pytest benchmarks/ --benchmark-disable`` once); MOSI shapes with env
MSA_FAST_BENCH_FULL=1, e.g. ``MSA_FAST_BENCH_FULL=1 pytest benchmarks/bench_ops.py --benchmark-only``.
The cases (masked and unmasked, head dims 16 / 32 / 64) come from ``msa_fast.bench.ops._cases`` and the providers of
each op from ``msa_fast.bench.ops.PROVIDERS`` (both shared with ``msa-fast bench ops``): only combinations that exist
are generated. pytest-benchmark times one provider after the other; for ratios paired within each repetition (robust
to outside load) use ``msa-fast bench ops``.
"""
import functools
import os

import pytest

from msa_fast import _ext
from msa_fast.bench.ops import PROVIDERS, _cases, _step, make_case

FULL = os.environ.get("MSA_FAST_BENCH_FULL") == "1"
SHAPE, CASES = _cases(FULL)  # (op, D, K, masked); expert_mixture: D = d_model, K = experts
_CPP = _ext.cpp_available()
PARAMS = [pytest.param(op, D, K, masked, provider, mode,
                       id=f"{op}-D{D}-K{K}-{'masked' if masked else 'unmasked'}-{provider}-{mode}")
          for op, D, K, masked in CASES
          for provider in PROVIDERS[op] if provider != "cpp" or _CPP
          for mode in ("fwd", "fwd+bwd")]


@functools.lru_cache(maxsize=1)  # parameters are grouped by case: build each case's tensors once
def _case(op, D, K, masked):
    return make_case(op, SHAPE, D, K, masked=masked)


@pytest.mark.parametrize("op, D, K, masked, provider, mode", PARAMS)
def test_bench_ops(benchmark, op, D, K, masked, provider, mode):
    case = _case(op, D, K, masked)
    benchmark.group = f"{op}-D{D}-K{K}-{'masked' if masked else 'unmasked'}-{mode}"
    benchmark(_step(case["providers"][provider], case["inputs"], mode == "fwd+bwd"))
