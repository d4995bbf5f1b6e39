"""BERT text encoder built offline: from a local path / HF cache, a ``BertConfig``, or a dict of its kwargs.

No network access at run time: a name that is not in the local cache fails with a clear message instead of a
download. Models that read the pickle's precomputed ``text`` features skip BERT entirely.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Union

from torch import nn

BertSpec = Union[str, os.PathLike, Mapping[str, Any], Any]


def build_bert(spec: BertSpec, add_pooling_layer: bool = True) -> nn.Module:
    """A ``transformers.BertModel``.

    ``spec``: a ``BertConfig``; a dict of ``BertConfig`` kwargs (random init, as in tests and parity fixtures);
    or a local directory / cached model name (weights loaded with ``local_files_only=True``).
    """
    from transformers import BertConfig, BertModel

    if isinstance(spec, BertConfig):
        config = spec
    elif isinstance(spec, Mapping):
        # no forced attention implementation: transformers picks the one it picks for a pretrained model (SDPA),
        # so a BERT built from a config costs what the real one costs; pass attn_implementation to choose
        config = BertConfig(**dict(spec))
    elif isinstance(spec, (str, os.PathLike)):
        try:
            return BertModel.from_pretrained(str(spec), local_files_only=True, add_pooling_layer=add_pooling_layer)
        except OSError as err:
            raise ValueError(
                f"bert={str(spec)!r}: not a local BERT directory or a model in the local Hugging Face cache "
                "(msa_fast never downloads at run time; pass a local path or a BertConfig dict)"
            ) from err
    else:
        raise TypeError(f"bert must be a path, a model name, a BertConfig or a dict of its kwargs, got {type(spec)}")
    return BertModel(config, add_pooling_layer=add_pooling_layer)


#: The small BERT the parity fixtures and tests use (1 layer, vocab 1000, hidden 768).
TINY_BERT_CONFIG: dict[str, Any] = dict(
    vocab_size=1000, hidden_size=768, num_hidden_layers=1, num_attention_heads=12, intermediate_size=3072,
    max_position_embeddings=512, type_vocab_size=2, hidden_act="gelu", hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, pad_token_id=0, initializer_range=0.02,
)
#: BERT-base's shape (bert-base-uncased: 12 layers, 110 M parameters; SIMS' bert-base-chinese differs only in the
#: vocabulary) with random weights: benchmarks get the real cost without a download.
BERT_BASE_CONFIG: dict[str, Any] = dict(TINY_BERT_CONFIG, vocab_size=30522, num_hidden_layers=12)
