"""Test fixtures (the TRITON_INTERPRET / cache setup lives in the root conftest.py, shared with benchmarks/)."""
import os

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

SEED = 1234


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state (fresh random inputs, reproducible failures)."""
    torch.manual_seed(SEED)
    yield


@pytest.fixture
def seed() -> int:
    return SEED


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Device for Triton kernel tests: CUDA when present, else CPU under the interpreter (skip if neither)."""
    if _HAS_CUDA:
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.importorskip("triton")
        return "cpu"
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1")


ATOL_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_error_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_same_dtype: torch.Tensor,
                      atol: float | None = None) -> None:
    """Kernel error vs the fp64 reference <= 2x the same-dtype torch reference's error + ``atol`` (FlagAttention /
    flash-attention rule; atol defaults to a small per-dtype floor); NaN anywhere fails.
    (Local helper, used through the ``error_rule`` fixture: msa_fast.testing has no shared one yet.)"""
    atol = ATOL_FLOOR[got.dtype] if atol is None else atol
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    if got.numel() == 0:
        return
    got = got.double()
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    err = (got - ref64).abs().max().item()
    err_torch = (ref_same_dtype.double() - ref64).abs().max().item()
    bound = 2 * err_torch + atol
    assert err <= bound, f"{name}: kernel error {err:.3e} > 2 x torch error {err_torch:.3e} + {atol:g}"


@pytest.fixture
def error_rule():
    return assert_error_rule


@pytest.fixture
def poison_empty(monkeypatch):
    """Make ``torch.empty`` return NaN-filled float tensors, so any output element a kernel forgets to write shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    yield
