"""Fused ops: one contract, three backends (Triton on CUDA, C++/OpenMP on CPU, PyTorch reference anywhere).

Public functional API (shapes in each docstring):
- ``attention(q, k, v, key_padding_mask=None, k_lengths=None, query_padding_mask=None, scale=None, dropout_p=0.0)``
- ``multi_source_attention(q, sources, scale=None, query_padding_mask=None)``
- ``bottleneck_exchange(queries, keys, values, query_padding_masks=None, key_padding_mask=None, scale=None)``
- ``masked_mean(x, valid=None, *, key_padding_mask=None)``
- ``dropout(x, p, training=True, seed=None)`` (counter-RNG mask, regenerated in backward)
- ``expert_mixture(x, gates, w1, b1, w2, b2, activation="gelu")`` (dense gated mixture of E expert FFNs) and
  ``expert_mixture_topk(x, expert_idx, expert_weight, w1, b1, w2, b2, activation="gelu")`` (top-k routed)

Mask conventions — every mask is a bool tensor and its name says what True means:
- ``key_padding_mask``, ``query_padding_mask``, ``query_padding_masks``, sources' masks: **True = padding**
  (attention ops; ``masked_mean(x, key_padding_mask=...)`` too);
- ``valid`` of ``masked_mean``: **True = valid** (averaged); its old keyword ``mask=`` is refused (TypeError).
Non-bool (0/1) masks are refused with a TypeError naming the convention. A fully padded row (e.g. a missing
modality) is legitimate and gives zeros, never NaN, so inverted masks cannot be detected from their values.

Non-finite values: NaN / ±inf in q or k propagate exactly as in ``msa_fast.testing.reference`` on every backend — a
row with a NaN or +inf score on a valid key is NaN, a row whose valid scores are all −inf (or all keys padded) is
zero, padded keys / query rows never matter; ``masked_mean`` propagates NaN / inf at valid positions only.
Every op takes ``backend="auto" | "triton" | "cpp" | "torch"``; ``use_backend(name)`` / env ``MSA_FAST_BACKEND``
change what "auto" means (routing rules: ``msa_fast.ops._dispatch`` and ``msa_fast.ops.attention``).
"""
from ._dispatch import use_backend
from .attention import attention
from .bottleneck_exchange import bottleneck_exchange
from .dropout import dropout
from .expert_mixture import expert_mixture, expert_mixture_topk
from .masked_mean import masked_mean
from .multi_source_attention import multi_source_attention

__all__ = ["attention", "bottleneck_exchange", "dropout", "expert_mixture", "expert_mixture_topk", "masked_mean",
           "multi_source_attention", "use_backend"]
