"""pytest-benchmark suite for the fused CPU ops: cpp vs the eager composition vs torch SDPA (expert_mixture: vs one
batched torch.bmm composition, provider "bmm").

Tiny shapes by default (CI runs ``pytest benchmarks/ --benchmark-disable`` once); MOSI shapes with env
MSA_FAST_BENCH_FULL=1, e.g. ``MSA_FAST_BENCH_FULL=1 pytest benchmarks/bench_ops.py --benchmark-only``.
Cases come from ``msa_fast.bench.ops.make_case`` (shared with ``msa-fast bench ops``).
"""
import os

import pytest

from msa_fast import _ext
from msa_fast.bench.ops import MOSI, TINY, _step, make_case

SHAPE = MOSI if os.environ.get("MSA_FAST_BENCH_FULL") == "1" else TINY
CASES = [("attention", 16, 0), ("attention", 32, 0), ("multi_source", 16, 0), ("bottleneck", 16, 8),
         ("bottleneck", 16, 4), ("masked_mean", 16, 0), ("self_attention_dropout", 16, 0), ("dropout", 16, 0),
         ("expert_mixture", 128 if SHAPE is MOSI else 16, 4)]  # expert_mixture: D = d_model, K = experts


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["eager", "sdpa", "bmm", "cpp"])
@pytest.mark.parametrize("op, D, K", CASES, ids=[f"{o}-D{d}-K{k}" for o, d, k in CASES])
def test_bench_ops(benchmark, op, D, K, provider, mode):
    if provider == "cpp" and not _ext.cpp_available():
        pytest.skip("msa_fast._C not built")
    case = make_case(op, SHAPE, D, K, masked=True)
    if provider not in case["providers"]:
        pytest.skip(f"no {provider} provider for {op}")
    benchmark.group = f"{op}-D{D}-K{K}-{mode}"
    benchmark(_step(case["providers"][provider], case["inputs"], mode == "fwd+bwd"))
