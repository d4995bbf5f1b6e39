"""The C++ extension: importable where it must be (CI sets MSA_FAST_REQUIRE_EXT=1 after building it)."""
import os

import pytest
import torch

from msa_fast import _ext


@pytest.mark.skipif(os.environ.get("MSA_FAST_REQUIRE_EXT", "0") != "1",
                    reason="MSA_FAST_REQUIRE_EXT=1 not set (CI sets it after building the extension)")
def test_extension_is_built_and_importable():
    lib = _ext.cpp_extension()
    assert lib is not None, "msa_fast._C did not import although MSA_FAST_REQUIRE_EXT=1"
    for name in ("attention_forward", "attention_backward", "dropout_apply", "row_topk", "bottleneck_forward",
                 "bottleneck_backward", "masked_mean_forward", "masked_mean_backward"):
        assert hasattr(lib, name), f"msa_fast._C lacks {name}"


def test_extension_rejects_unsupported_dtype_clearly():
    lib = _ext.cpp_extension()
    if lib is None:
        pytest.skip("msa_fast._C not built")
    q = torch.randn(1, 1, 2, 4, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        lib.attention_forward(q, q, q, torch.ones(1, 2, dtype=torch.bool), [0, 2], None, 1.0, 0.0, 0)
    q = q.float()
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        lib.attention_forward(q, q, q, torch.ones(1, 2, dtype=torch.bool), [0, 2], None, 1.0, 1.0, 0)
