"""Fused ops: one contract, three backends (Triton on CUDA, C++/OpenMP on CPU, PyTorch reference anywhere).

Public functional API (shapes in each docstring):
- ``attention(q, k, v, key_padding_mask=None, k_lengths=None, query_padding_mask=None, scale=None, dropout_p=0.0)``
- ``multi_source_attention(q, sources, scale=None, query_padding_mask=None)``
- ``bottleneck_exchange(queries, keys, values, query_padding_masks=None, key_padding_mask=None, scale=None)``
- ``masked_mean(x, mask)``
- ``dropout(x, p, training=True, seed=None)`` (counter-RNG mask, regenerated in backward)
Every op takes ``backend="auto" | "triton" | "cpp" | "torch"``; ``use_backend(name)`` / env ``MSA_FAST_BACKEND``
change what "auto" means (routing rules: ``msa_fast.ops._dispatch`` and ``msa_fast.ops.attention``).
"""
from ._dispatch import use_backend
from .attention import attention
from .bottleneck_exchange import bottleneck_exchange
from .dropout import dropout
from .masked_mean import masked_mean
from .multi_source_attention import multi_source_attention

__all__ = ["attention", "bottleneck_exchange", "dropout", "masked_mean", "multi_source_attention", "use_backend"]
