"""MIDG (reconstruction, not the authors' code): adapter gate at 0 = the frozen encoder, frozen BERT untouched,
per-domain projections (unseen domain = mean of the source maps), routing modes, invariance objectives, fused op."""
from __future__ import annotations

import pytest
import torch

from msa_fast.models import build, get_model_class
from msa_fast.models.midg.invariance import irm_penalty, vrex_penalty
from msa_fast.models.midg.layers import DomainProjection, load_balance_loss
from msa_fast.models.midg.bench import setup
from msa_fast.train import smoke_model_overrides


def _tiny(**kw):
    torch.manual_seed(0)
    return build("midg", "mosi", **{**smoke_model_overrides("midg"), **kw})


def test_labelled_reconstruction():
    cls = get_model_class("midg")
    assert "reconstruction, not the authors' code" in cls.provenance
    assert "reconstruction, not the authors' code" in (__import__(cls.__module__, fromlist=["x"]).__doc__ or "")


def test_bert_path_gate_zero_equals_frozen_encoder_and_bert_gets_no_gradient():
    model, batch = setup(batch_size=3)  # tiny BERT (1 layer), one CMA adapter after it
    enc = model.text_encoder
    assert len(enc.adapters) == len(enc.bert.encoder.layer)
    model.eval()
    with torch.no_grad():
        adapted = model(batch)["text"]
        plain = enc.bert(input_ids=batch.text_ids, attention_mask=batch.text_attention_mask,
                         token_type_ids=batch.text_segment_ids)[0]  # outside forward: hooks are inactive
    torch.testing.assert_close(adapted, plain)
    with torch.no_grad():
        enc.adapters[0].gate.fill_(0.5)
        assert not torch.allclose(model(batch)["text"], plain)
    model.train()
    assert not enc.bert.training  # a frozen encoder never draws dropout
    model.training_step(batch)["loss"].backward()
    assert all(p.grad is None for p in enc.bert.parameters())
    assert enc.adapters[0].gate.grad is not None
    group = model.optimizer_param_groups()[0]["params"]
    assert all(p.requires_grad for p in group) and len(group) < len(list(model.parameters()))


def test_domain_projection_unseen_domain_uses_mean_of_source_maps():
    proj = DomainProjection(5, 4, num_domains=2)
    x = torch.randn(3, 7, 5)
    out = proj(x, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(out[0], x[0] @ proj.weight[0] + proj.bias[0])
    torch.testing.assert_close(out[1], x[1] @ proj.weight[1] + proj.bias[1])
    mean_of_maps = ((x[2] @ proj.weight[0] + proj.bias[0]) + (x[2] @ proj.weight[1] + proj.bias[1])) / 2
    torch.testing.assert_close(out[2], mean_of_maps)


@pytest.mark.parametrize("routing", ["dense", "topk"])
@pytest.mark.parametrize("invariance", ["dann", "vrex", "irm", "none"])
def test_objectives_run_and_are_finite(routing, invariance):
    model = _tiny(routing=routing, invariance=invariance, num_domains=2)
    _, batch = setup(batch_size=6, use_text_features=True, **{k: v for k, v in smoke_model_overrides("midg").items()
                                                                 if k != "use_text_features"})
    batch = batch.replace(domain=torch.tensor([0, 1, 0, 1, 0, 2]))  # 2 = unseen: no invariance term
    losses = model.training_step(batch)
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert (float(losses["l_inv"].detach()) > 0) == (invariance != "none")
    assert (float(losses["l_lb"]) > 0) == (routing == "topk")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_single_domain_has_no_invariance_term():
    model = _tiny()
    _, batch = setup(batch_size=4, **smoke_model_overrides("midg"))
    assert float(model.training_step(batch)["l_inv"]) == 0.0


def test_penalties_closed_forms():
    pred, y = torch.tensor([0.5, -0.2, 0.1, 0.3]), torch.tensor([0.0, 0.0, 0.4, 0.4])
    dom = torch.tensor([0, 0, 1, 1])
    risks = torch.stack([(pred[:2] - y[:2]).abs().mean(), (pred[2:] - y[2:]).abs().mean()])
    torch.testing.assert_close(vrex_penalty(pred, y, dom, 2, "l1"), risks.var(unbiased=False))
    scale = torch.ones((), requires_grad=True)
    expected = 0.0
    for rows in (slice(0, 2), slice(2, 4)):
        (g,) = torch.autograd.grad(((pred[rows] * scale - y[rows]) ** 2).mean(), scale)
        expected += float(g) ** 2
    assert abs(float(irm_penalty(pred, y, dom, 2, "mse")) - expected) < 1e-6
    probs = torch.full((8, 4), 0.25)
    assert abs(float(load_balance_loss(probs, torch.arange(8).remainder(4)[:, None])) - 1.0) < 1e-6


def test_experts_call_the_fused_op(monkeypatch):
    import importlib

    em = importlib.import_module("msa_fast.ops.expert_mixture")  # the module (msa_fast.ops re-exports the function)

    calls = []
    real = em.expert_mixture
    monkeypatch.setattr(em, "expert_mixture", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    model = _tiny()
    _, batch = setup(batch_size=2, **smoke_model_overrides("midg"))
    model(batch)
    n_valid = int(batch.text_attention_mask.sum() + batch.audio_lengths.sum() + batch.vision_lengths.sum())
    assert calls == [torch.Size([n_valid, model.config["d_model"]])]  # only real tokens are routed


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="invariance must be one of"):
        _tiny(invariance="coral")
    with pytest.raises(ValueError, match="routing must be one of"):
        _tiny(routing="switch")
