"""msa_fast.nn layers: outputs and gradients of inputs *and layer weights* vs the same layer run in float64 on the
reference backend (error rule of msa_fast.testing), parity with nn.MultiheadAttention, clear errors."""
import copy

import pytest
import torch
from torch import nn

from msa_fast.nn import BottleneckFusion, BottleneckFusionLevel, CrossModalAttention, MultiSourceAttention
from msa_fast.testing import assert_close_to_reference, available_backends, random_padding_mask

BACKENDS = available_backends(include_triton=False)


def _compare_layer(make, run, inputs64, backend):
    """run(layer, *inputs) on the backend in fp32 vs fp64 / fp32 on the torch backend: outputs and all grads."""
    base = make()
    results = {}
    for tag, dtype, be in (("ref64", torch.float64, "torch"), ("torch32", torch.float32, "torch"),
                           ("got", torch.float32, backend)):
        layer = copy.deepcopy(base).to(dtype)
        for mod in layer.modules():
            if hasattr(mod, "backend"):
                mod.backend = be
        xs = [x.detach().to(dtype).requires_grad_(True) for x in inputs64]
        out = run(layer, *xs)
        outs = out if isinstance(out, (list, tuple)) else [out]
        torch.manual_seed(7)
        loss = sum((o * torch.randn(o.shape, dtype=torch.float64).to(dtype)).sum() for o in outs)
        loss.backward()
        grads = [x.grad for x in xs] + [p.grad for p in layer.parameters()]
        results[tag] = (outs, grads)
    (o64, g64), (o32, g32), (ob, gb) = results["ref64"], results["torch32"], results["got"]
    for i, (a, b, c) in enumerate(zip(ob, o64, o32)):
        assert_close_to_reference(a, b, c, name=f"output[{i}]")
    for i, (a, b, c) in enumerate(zip(gb, g64, g32)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert_close_to_reference(a, b, c, name=f"grad[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_modal_attention_weights_grads(backend):
    B, Lq, Lk, E = 3, 9, 70, 32
    kpm = random_padding_mask(B, Lk)
    _compare_layer(lambda: CrossModalAttention(E, 4, kdim=20, vdim=20),
                   lambda layer, q, k: layer(q, k, key_padding_mask=kpm),
                   [torch.randn(B, Lq, E, dtype=torch.float64), torch.randn(B, Lk, 20, dtype=torch.float64)], backend)


def test_cross_modal_attention_matches_multihead_attention():
    mha = nn.MultiheadAttention(24, 3, batch_first=True).eval()
    layer = CrossModalAttention.from_multihead_attention(mha).eval()
    q, kv = torch.randn(2, 5, 24), torch.randn(2, 11, 24)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 6:] = True
    torch.testing.assert_close(layer(q, kv, kv, key_padding_mask=kpm), mha(q, kv, kv, key_padding_mask=kpm)[0],
                               atol=1e-5, rtol=1e-4)


def test_cross_modal_attention_kdim_vdim_mapping():
    mha = nn.MultiheadAttention(16, 2, batch_first=True, kdim=6, vdim=10).eval()
    layer = CrossModalAttention.from_multihead_attention(mha).eval()
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 7, 6), torch.randn(2, 7, 10)
    torch.testing.assert_close(layer(q, k, v), mha(q, k, v)[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_source_attention_layer(backend):
    B, Lq, E = 2, 6, 32
    lens = (13, 40)
    masks = [random_padding_mask(B, L) for L in lens]
    _compare_layer(lambda: MultiSourceAttention(E, 2, 2, source_dims=(E, 12)),
                   lambda layer, q, a, v: layer(q, [(a, masks[0]), (v, masks[1])]),
                   [torch.randn(B, Lq, E, dtype=torch.float64), torch.randn(B, 13, E, dtype=torch.float64),
                    torch.randn(B, 40, 12, dtype=torch.float64)], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["sublayer", "post"])
def test_bottleneck_fusion_level(backend, norm):
    B, E = 2, 32
    lens = (10, 37, 21)
    masks = [random_padding_mask(B, L, empty_row=(i == 2)) for i, L in enumerate(lens)]
    _compare_layer(lambda: BottleneckFusionLevel(E, 4, norm=norm, ffn_dim=16, scale=0.3),
                   lambda layer, b, t, a, v: (lambda r: [r[0], *r[1]])(layer(b, [t, a, v], masks)),
                   [torch.randn(B, 8, E, dtype=torch.float64)] + [torch.randn(B, L, E, dtype=torch.float64)
                                                                  for L in lens], backend)


def test_bottleneck_fusion_stack_halves_tokens_and_backprops():
    torch.manual_seed(0)
    model = BottleneckFusion(16, 2, num_bottleneck=8, depth=3)
    mods = [torch.randn(2, L, 16) for L in (5, 9, 7)]
    b, outs = model(mods)
    assert b.shape == (2, 2, 16) and [o.shape for o in outs] == [m.shape for m in mods]
    (b.sum() + sum(o.sum() for o in outs)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_layer_errors():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CrossModalAttention(10, 3)
    with pytest.raises(ValueError, match="num_bottleneck"):
        BottleneckFusion(16, 2, num_bottleneck=17)
    with pytest.raises(ValueError, match="norm must be one of"):
        BottleneckFusionLevel(16, 2, norm="pre")
    with pytest.raises(ValueError, match="sources must have 2 entries"):
        MultiSourceAttention(16, 2, 2)(torch.randn(1, 2, 16), [(torch.randn(1, 3, 16), None)])


def test_bert_from_a_config_uses_the_pretrained_attention_implementation():
    """A BERT built from a dict (tests, benchmarks) must cost what a pretrained one costs: transformers' default
    attention (SDPA), not a forced eager path; an explicit choice is kept."""
    from transformers import BertConfig, BertModel

    from msa_fast.nn.text_encoder import TINY_BERT_CONFIG, build_bert

    default = BertModel(BertConfig(**TINY_BERT_CONFIG)).config._attn_implementation
    assert build_bert(TINY_BERT_CONFIG).config._attn_implementation == default == "sdpa"
    eager = dict(TINY_BERT_CONFIG, attn_implementation="eager")
    assert build_bert(eager).config._attn_implementation == "eager"
