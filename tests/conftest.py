"""Test fixtures (the TRITON_INTERPRET / cache setup lives in the root conftest.py, shared with benchmarks/)."""
import os

import pytest
import torch

from msa_fast.testing import assert_close_to_reference

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


@pytest.fixture
def error_rule():
    """``error_rule(name, got, ref64, ref_same_dtype)``: the shared 2x-same-dtype-error rule."""
    def rule(name, got, ref64, ref_same_dtype, atol=None):
        assert_close_to_reference(got, ref64, ref_same_dtype, name=name, atol=atol)
    return rule


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
