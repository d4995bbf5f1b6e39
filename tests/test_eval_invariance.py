"""Evaluation contract: a sample's prediction does not depend on the evaluation batch (its size, the other samples
in it, their order).

Every registered model, in a tiny configuration, is evaluated through the trainer's ``evaluate`` (model.eval(),
torch.no_grad(), ``make_loader(shuffle=False)``) on synthetic MOSI with eval batch sizes 1, 5 and the whole split,
and on a permutation of the split: per-sample predictions must agree up to fp32 round-off. DashFusion also gets the
exact statement behind its fix: the default model on a ragged batch gives every sample the prediction that the
official behaviour (``unmasked_text_padding=True``) gives that sample evaluated alone.
"""
from __future__ import annotations

import copy

import pytest
import torch

from msa_fast.data.batch import Batch
from msa_fast.data.dataset import MMSADataset, select_rows
from msa_fast.models.registry import available_models, build, get_config
from msa_fast.train import _needs_aligned, evaluate, load_data, refresh_train_state, smoke_model_overrides

N_TRAIN, N_TEST = 24, 13
EVAL_BATCH_SIZES = (1, 5, N_TEST)  # 5 leaves a last batch of 3; N_TEST = all at once


def _overrides(name: str, text: str) -> dict:
    over = smoke_model_overrides(name)
    over["use_text_features"] = text == "features"
    return over


def _setup(name: str, text: str, **extra):
    """A tiny ``name`` as the trainer leaves it for evaluation (prepare_epoch seen, train-derived state rebuilt), its
    test split and the prediction scale."""
    over = {**_overrides(name, text), **extra}
    config = get_config(name, "mosi", **over)
    data = load_data("synthetic", "mosi", seed=0, aligned=_needs_aligned(config), n_train=N_TRAIN, n_valid=4,
                     n_test=N_TEST)
    use_tf = over["use_text_features"] or None
    train = MMSADataset(data["train"], use_text_features=use_tf, validate=False, split="train")
    test = MMSADataset(data["test"], use_text_features=use_tf, validate=False, split="test")
    torch.manual_seed(0)
    model = build(name, "mosi", **over)
    with torch.no_grad():  # away from the (near-constant) initial predictions, so differences would show
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.prepare_epoch(1, train)
    refresh_train_state(model, train)
    return model, test


def _permuted(dataset: MMSADataset, perm: torch.Tensor) -> MMSADataset:
    """The same samples (index included) in the order ``perm``."""
    out = copy.copy(dataset)
    out.tensors = {k: v[perm] for k, v in dataset.tensors.items()}
    out.ids = [dataset.ids[i] for i in perm.tolist()]
    out.raw_text = [dataset.raw_text[i] for i in perm.tolist()]
    return out


@pytest.mark.parametrize("text", ["features", "bert"])
@pytest.mark.parametrize("name", available_models(library_only=True))
def test_eval_predictions_do_not_depend_on_the_batch(name, text):
    model, test = _setup(name, text)
    runs = {bs: evaluate(model, test, "mosi", batch_size=bs, return_predictions=True) for bs in EVAL_BATCH_SIZES}
    ref = runs[N_TEST]["predictions"]
    assert ref.shape == (N_TEST,) and torch.isfinite(ref).all()
    scale = float(ref.abs().max())
    assert float(ref.std()) > 1e-3 * max(scale, 1e-6), "predictions are (nearly) constant: the check would be empty"
    atol = 1e-5 * max(scale, 1e-3)
    for bs, res in runs.items():
        torch.testing.assert_close(res["predictions"], ref, rtol=0, atol=atol,
                                   msg=lambda m: f"{name} ({text}), eval batch size {bs} vs all at once: {m}")
        assert abs(res["Loss"] - runs[N_TEST]["Loss"]) <= 2e-4, (bs, res["Loss"], runs[N_TEST]["Loss"])
    perm = torch.randperm(N_TEST, generator=torch.Generator().manual_seed(7))
    got = evaluate(model, _permuted(test, perm), "mosi", batch_size=5, return_predictions=True)["predictions"]
    torch.testing.assert_close(got, ref[perm], rtol=0, atol=atol,
                               msg=lambda m: f"{name} ({text}), permuted samples, eval batch size 5: {m}")


# ---------------------------------------------------------------------------------------------------------------
# DashFusion: the default = the official model applied to each sample alone
# ---------------------------------------------------------------------------------------------------------------
def test_dashfusion_official_flag_is_batch_dependent():
    """``unmasked_text_padding=True`` (official) lets text padding up to the batch's longest text into the fusion:
    the contract above fails for it, which is why it is not the default."""
    model, test = _setup("dashfusion", "features", unmasked_text_padding=True)
    one = evaluate(model, test, "mosi", batch_size=1, return_predictions=True)["predictions"]
    full = evaluate(model, test, "mosi", batch_size=N_TEST, return_predictions=True)["predictions"]
    assert (one - full).abs().max() > 1e-3 * one.abs().max()


def _tiny_dashfusion(**kw):
    cfg = dict(dataset="mosi", use_text_features=True, text_dim=24, d_model=16, encoder_heads=2, encoder_ff_dim=24,
               ta_heads=2, ta_dim_head=8, fusion_heads=2, fusion_ff_dim=24, audio_layers=1, vision_layers=1,
               audio_len=12, vision_len=9, audio_dim=5, vision_dim=7)
    cfg.update(kw)
    return build("dashfusion", **cfg)


@pytest.mark.parametrize("depth,lengths", [(2, (7, 3, 11, 1, 5, 0)), (3, (4, 13, 2, 9, 8, 6))])
@pytest.mark.parametrize("prune_rows", [True, False])
def test_dashfusion_batch_equals_official_batch_of_one(depth, lengths, prune_rows):
    """Every sample of a ragged batch (texts shorter than the 8 bottleneck rows, an empty text) gets exactly what
    the official behaviour gives it alone (text cropped to its own length), in float64."""
    torch.manual_seed(3)
    model = _tiny_dashfusion(fusion_depth=depth, prune_rows=prune_rows).double().eval()
    official = _tiny_dashfusion(fusion_depth=depth, prune_rows=prune_rows, unmasked_text_padding=True).double()
    official.load_state_dict(model.state_dict())
    official.eval()
    b, width = len(lengths), 15
    g = torch.Generator().manual_seed(5)
    c = model.config
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    a_len = torch.randint(1, c["audio_len"] + 1, (b,), generator=g)
    v_len = torch.randint(1, c["vision_len"] + 1, (b,), generator=g)
    audio = torch.randn(b, c["audio_len"], c["audio_dim"], generator=g, dtype=torch.float64)
    vision = torch.randn(b, c["vision_len"], c["vision_dim"], generator=g, dtype=torch.float64)
    audio *= (torch.arange(c["audio_len"])[None] < a_len[:, None]).unsqueeze(-1)
    vision *= (torch.arange(c["vision_len"])[None] < v_len[:, None]).unsqueeze(-1)
    feats = torch.randn(b, width, c["text_dim"], generator=g, dtype=torch.float64) * mask.unsqueeze(-1)
    batch = Batch(text_ids=torch.randint(103, 999, (b, width), generator=g) * mask, text_attention_mask=mask,
                  text_segment_ids=torch.zeros_like(mask), audio=audio, vision=vision, audio_lengths=a_len,
                  vision_lengths=v_len, labels=torch.zeros(b, dtype=torch.float64), index=torch.arange(b),
                  text_features=feats)
    with torch.no_grad():
        got = model(batch)
        alone = torch.cat([official(select_rows(batch, torch.tensor([i])))["M"] for i in range(b)])
        assert not torch.allclose(official(batch)["M"], alone, atol=1e-6)  # the official batch result differs
    torch.testing.assert_close(got["M"], alone, rtol=1e-10, atol=1e-12)
    assert got["text_encoder.all"].shape[1] == max(lengths)  # still cropped to the batch's longest text


@pytest.mark.slow
def test_dashfusion_parity_fixture_flag_and_per_sample():
    """Official fixture (batch of 8 ragged texts): ``unmasked_text_padding=True`` reproduces the official outputs;
    the default gives each sample the official output of that sample alone."""
    from parity_fixtures import load_parity

    fx = load_parity("dashfusion_mosi.pt")
    x = fx["inputs_mmsa"]
    tb = x["text_bert"].long()
    n = x["regression_labels"].shape[0]
    batch = Batch(text_ids=tb[:, 0], text_attention_mask=tb[:, 1], text_segment_ids=tb[:, 2], audio=x["audio"],
                  vision=x["vision"], audio_lengths=x["audio_lengths"], vision_lengths=x["vision_lengths"],
                  labels=x["regression_labels"], index=torch.arange(n))
    official = build("dashfusion", dataset="mosi", bert=fx["bert_config"], unmasked_text_padding=True)
    official.load_official_state_dict(fx["state_dict"])
    official.eval()
    model = build("dashfusion", dataset="mosi", bert=fx["bert_config"])
    model.load_official_state_dict(fx["state_dict"])
    model.eval()
    with torch.no_grad():
        out = official(batch)
        e = fx["outputs"]["M"]
        assert ((out["M"] - e).abs().max() / e.abs().max()).item() <= 1e-4
        alone = torch.cat([official(select_rows(batch, torch.tensor([i])))["M"] for i in range(n)])
        got = model(batch)["M"]
    torch.testing.assert_close(got, alone, rtol=0, atol=1e-5 * float(alone.abs().max()))
