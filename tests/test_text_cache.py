"""Frozen-BERT feature cache (``msa_fast.nn.text_cache``) and the ``freeze_bert`` / ``bert_feature_cache`` options of
DashFusion, HME, LNLN and MMCL: cached features equal a fresh eval-mode forward bit for bit, each sample goes through
BERT once, changed weights or a changed text never hit, and a training step with the cache equals the same step
without it."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from msa_fast.data.dataset import MMSADataset
from msa_fast.data.missing import ModalityDrop, TokenErasure
from msa_fast.data.synthetic import synthetic
from msa_fast.models import build
from msa_fast.models.registry import get_config, get_model_class
from msa_fast.nn.text_cache import TextFeatureCache, frozen_text_features, sample_keys
from msa_fast.nn.text_encoder import TINY_BERT_CONFIG, build_bert
from msa_fast.train.config import TrainConfig
from msa_fast.train.optim import OptimizerSet

FROZEN_MODELS = ("dashfusion", "hme", "lnln", "mmcl")
_TRAIN = TrainConfig(epochs=1, lr=1e-3, weight_decay=0.0, warmup_epochs=0, lr_schedule="constant",
                     schedule_step="batch")


# ---------------------------------------------------------------------------------------------------------------
# the cache on its own
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return build_bert(TINY_BERT_CONFIG, add_pooling_layer=False)


def _inputs(b=6, width=20, lengths=(7, 3, 20, 1, 12, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths[:b])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    ids = torch.randint(103, 999, (b, width), generator=g) * mask
    ids[:, 0] = 101
    seg = torch.zeros_like(ids)
    return ids, mask, seg, [("id", f"s{i}") for i in range(b)]


def _fresh(bert, ids, mask, seg):
    was = bert.training
    bert.eval()
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask, token_type_ids=seg).last_hidden_state
    bert.train(was)
    return out


def test_cached_features_equal_a_fresh_eval_forward_exactly(bert):
    ids, mask, seg, keys = _inputs()
    bert.train()  # the cache computes in eval mode whatever the module's mode, and restores it
    cache = TextFeatureCache()
    for width in (ids.shape[1], int(mask.sum(1).max()), 9):  # padded, DashFusion's crop (longest text), a cut
        args = (ids[:, :width], mask[:, :width], seg[:, :width])
        expected = _fresh(bert, *args)
        first = cache(bert, *args, keys)
        assert bert.training
        assert torch.equal(first, expected)
        rows = cache.stats["rows_encoded"]
        second = cache(bert, *args, keys)
        assert cache.stats["rows_encoded"] == rows  # nothing recomputed
        assert torch.equal(second, expected)
    # a batch mixing seen and unseen rows, in another order: one call on the unseen rows only
    new_ids, new_mask, new_seg, _ = _inputs(b=3, lengths=(4, 20, 9), seed=5)
    order = torch.tensor([4, 0, 2])
    ids2 = torch.cat([ids[order], new_ids])
    mask2, seg2 = torch.cat([mask[order], new_mask]), torch.cat([seg[order], new_seg])
    keys2 = [keys[i] for i in order.tolist()] + [("id", "n0"), ("id", "n1"), ("id", "n2")]
    calls, rows = cache.stats["encoder_calls"], cache.stats["rows_encoded"]
    got = cache(bert, ids2, mask2, seg2, keys2)
    assert cache.stats["encoder_calls"] == calls + 1 and cache.stats["rows_encoded"] == rows + 3
    assert torch.equal(got, _fresh(bert, ids2, mask2, seg2))
    # duplicates of one unseen sample are computed once
    dup = cache(bert, new_ids[[0, 0]], new_mask[[0, 0]], new_seg[[0, 0]], [("id", "d"), ("id", "d")])
    assert cache.stats["rows_encoded"] == rows + 4
    assert torch.equal(dup, _fresh(bert, new_ids[[0, 0]], new_mask[[0, 0]], new_seg[[0, 0]]))


def test_uncached_frozen_call_is_the_eval_forward(bert):
    ids, mask, seg, keys = _inputs()
    bert.train()
    got = frozen_text_features(bert, ids, mask, seg, keys, cache=None)
    assert bert.training and not got.requires_grad
    assert torch.equal(got, _fresh(bert, ids, mask, seg))


def test_changed_weights_invalidate(bert):
    model = copy.deepcopy(bert)
    ids, mask, seg, keys = _inputs()
    cache = TextFeatureCache()
    cache(model, ids, mask, seg, keys)
    assert cache.stats["digests"] == 1
    cache(model, ids, mask, seg, keys)
    assert cache.stats["digests"] == 1 and cache.stats["rows_encoded"] == 6  # no change: no new digest, all hits

    # load_state_dict with other weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["encoder.layer.0.output.dense.weight"] += 0.01
    model.load_state_dict(state)
    got = cache(model, ids, mask, seg, keys)
    assert cache.stats["rows_encoded"] == 12
    assert torch.equal(got, _fresh(model, ids, mask, seg))

    # an in-place edit under no_grad
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[ids[0, 1]] += 1.0
    got = cache(model, ids, mask, seg, keys)
    assert cache.stats["rows_encoded"] == 18
    assert torch.equal(got, _fresh(model, ids, mask, seg))

    # a replaced parameter
    model.embeddings.LayerNorm.weight = torch.nn.Parameter(model.embeddings.LayerNorm.weight.detach() * 1.5)
    got = cache(model, ids, mask, seg, keys)
    assert cache.stats["rows_encoded"] == 24
    assert torch.equal(got, _fresh(model, ids, mask, seg))

    # loading identical weights re-digests but keeps the entries (same digest)
    digests = cache.stats["digests"]
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    cache(model, ids, mask, seg, keys)
    assert cache.stats["digests"] == digests + 1 and cache.stats["rows_encoded"] == 24


def test_a_different_text_under_the_same_id_never_hits(bert):
    ids, mask, seg, keys = _inputs()
    cache = TextFeatureCache(max_variants=2)
    cache(bert, ids, mask, seg, keys)
    erased = ids.clone()
    erased[2, 3] = 100  # [UNK] in row 2, as TokenErasure does
    got = cache(bert, erased, mask, seg, keys)
    assert cache.stats["rows_encoded"] == 7  # only row 2
    assert torch.equal(got, _fresh(bert, erased, mask, seg))
    seg2 = seg.clone()
    seg2[4, 5:] = 1  # other segment ids
    cache(bert, ids, mask, seg2, keys)
    assert cache.stats["rows_encoded"] == 8
    # max_variants=2: sample s2 now holds (original, erased): a third variant drops the least recently used
    erased2 = ids.clone()
    erased2[2, 4] = 100
    cache(bert, erased2, mask, seg, keys)
    assert cache.stats["rows_encoded"] == 9
    before = cache.stats["rows_encoded"]
    cache(bert, ids, mask, seg, keys)  # the original of s2 was used last before 'erased': 'erased' was dropped
    assert cache.stats["rows_encoded"] == before
    cache(bert, erased, mask, seg, keys)
    assert cache.stats["rows_encoded"] == before + 1


def test_lru_bound_and_no_state_in_pickles(bert):
    ids, mask, seg, keys = _inputs()
    cache = TextFeatureCache(max_entries=4, storage="cpu")
    got = cache(bert, ids, mask, seg, keys)
    assert len(cache) == 4 and torch.equal(got, _fresh(bert, ids, mask, seg))
    got = cache(bert, ids, mask, seg, keys)  # rows 0, 1 were evicted; 2..5 hit (and 2, 3 evicted again by 0, 1)
    assert cache.stats["rows_encoded"] == 8 and torch.equal(got, _fresh(bert, ids, mask, seg))
    for clone in (pickle.loads(pickle.dumps(cache)), copy.deepcopy(cache)):
        assert len(clone) == 0 and clone.max_entries == 4 and clone.storage == "cpu"
    with pytest.raises(ValueError, match="max_entries"):
        TextFeatureCache(max_entries=0)
    with pytest.raises(ValueError, match="storage"):
        TextFeatureCache(storage="disk")


def test_sample_keys_fall_back_to_the_index():
    data = synthetic("mosi", n_train=4, n_valid=0, n_test=0, seed=0, aligned=True)
    batch = MMSADataset(data["train"])[[2, 0]]
    assert sample_keys(batch) == [("id", batch.ids[0]), ("id", batch.ids[1])]
    assert sample_keys(batch.replace(ids=[])) == [("index", 2), ("index", 0)]
    assert sample_keys(batch, torch.tensor([1])) == [("id", batch.ids[1])]


# ---------------------------------------------------------------------------------------------------------------
# the model options
# ---------------------------------------------------------------------------------------------------------------
FRAMES = 16  # unaligned audio / vision cropped to 16 frames (DashFusion / LNLN position tables have a fixed length)


def _config(name: str, **kw) -> dict:
    cls = get_model_class(name)
    over = {**cls.TINY_CONFIG, "use_text_features": False, "bert": TINY_BERT_CONFIG, **kw}
    if name in ("dashfusion", "lnln"):
        over.update(audio_len=FRAMES, vision_len=FRAMES)
    if name == "dashfusion":
        over.setdefault("contrastive_weight", 0.0)
    if name == "hme":
        over.setdefault("eval_retrieval", "in_batch")
    return over


def _build(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build(name, "mosi", **_config(name, **kw))


_DATA: dict = {}


def _dataset(aligned: bool) -> MMSADataset:
    if aligned not in _DATA:
        data = synthetic("mosi", n_train=12, n_valid=0, n_test=0, seed=1, aligned=aligned, text_features=False)
        split = data["train"]
        if not aligned:
            for m in ("audio", "vision"):
                split[m] = split[m][:, :FRAMES]
                split[f"{m}_lengths"] = split[f"{m}_lengths"].clip(1, FRAMES)
        _DATA[aligned] = MMSADataset(split)
    return _DATA[aligned]


def _batches(name: str, epoch: int) -> list:
    ds = _dataset(aligned=name in ("hme", "mmcl"))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(epoch)).tolist()
    out = []
    for start in range(0, len(ds), 6):
        b = ds[order[start:start + 6]]
        if name == "lnln":
            b = TokenErasure(seed=3)(b, epoch=epoch)
        elif name == "hme":
            b = ModalityDrop(mr=0.3, seed=3)(b, epoch=epoch)
        out.append(b)
    return out


@pytest.mark.parametrize("name", FROZEN_MODELS)
def test_freeze_bert_options(name):
    model = _build(name, freeze_bert=True)
    bert = model.bertmodel if hasattr(model, "bertmodel") else model.bert
    assert all(not p.requires_grad for p in bert.parameters())
    model.train()
    assert not any(m.training for m in bert.modules())
    assert model.bert_cache is not None and isinstance(model.bert_cache, TextFeatureCache)
    # left out of the optimizer; the cache is no part of the state_dict
    opts = OptimizerSet(model, _TRAIN, steps_per_epoch=1).optimizers.values()
    in_opt = {id(p) for opt in opts for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in bert.parameters()}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    assert set(model.state_dict()) == set(_build(name).state_dict())
    # the unfrozen default fine-tunes BERT and has no cache
    default = _build(name)
    assert default.bert_cache is None and not default.freeze_bert
    default_bert = default.bertmodel if hasattr(default, "bertmodel") else default.bert
    assert all(p.requires_grad for p in default_bert.parameters())
    assert _build(name, freeze_bert=True, bert_feature_cache=False).bert_cache is None


@pytest.mark.parametrize("name", FROZEN_MODELS)
def test_freeze_bert_errors(name):
    with pytest.raises(ValueError, match="freeze_bert=True needs use_text_features=False"):
        _build(name, freeze_bert=True, use_text_features=True)
    with pytest.raises(ValueError, match="bert_feature_cache_max_entries"):
        _build(name, freeze_bert=True, bert_feature_cache_max_entries=0)
    cls = get_model_class(name)
    for key, bad in (("freeze_bert", "yes"), ("bert_feature_cache", 1)):
        config = get_config(name, "mosi", **_config(name))
        config[key] = bad  # the registry's own check (build / --set) raises TypeError first; the model: ValueError
        with pytest.raises(ValueError, match=key):
            cls(config)
    if name == "dashfusion":
        with pytest.raises(ValueError, match="frozen_bert_width"):
            _build(name, freeze_bert=True, frozen_bert_width="full")


def _bert_rows_counter(model):
    bert = model.bertmodel if hasattr(model, "bertmodel") else model.bert
    if hasattr(bert, "model"):  # LNLN's wrapper
        bert = bert.model
    count = [0]
    def hook(module, args, kwargs, out):
        count[0] += kwargs["input_ids"].shape[0]
    bert.register_forward_hook(hook, with_kwargs=True)
    return count


def _step(model, batch, seed):
    torch.manual_seed(seed)  # the same dropout draws in both models (a frozen BERT draws none)
    model.zero_grad(set_to_none=True)
    losses = model.training_step(batch)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses, grads


@pytest.mark.parametrize("name,kw", [("dashfusion", {}), ("dashfusion", {"frozen_bert_width": "batch"}),
                                     ("dashfusion", {"contrastive_weight": 0.2}), ("hme", {}), ("lnln", {}),
                                     ("mmcl", {})])
def test_cached_training_equals_uncached_and_bert_sees_each_sample_once(name, kw):
    cached = _build(name, seed=1, freeze_bert=True, **kw)
    plain = _build(name, seed=1, freeze_bert=True, bert_feature_cache=False, **kw)
    plain.load_state_dict(cached.state_dict())
    rows = _bert_rows_counter(cached)
    cached.train(), plain.train()
    seen: set = set()
    n = len(_dataset(aligned=name in ("hme", "mmcl")))
    for epoch in (1, 2):
        if kw.get("contrastive_weight"):
            for m in (cached, plain):
                m.prepare_epoch(epoch, _dataset(aligned=False))
            if epoch == 1:  # encode_split went through the (padded-width) cache: every sample is in it
                assert rows[0] == n
                seen = {("complete", i) for i in range(n)}
        for step, batch in enumerate(_batches(name, epoch)):
            before = rows[0]
            a, ga = _step(cached, batch, seed=100 * epoch + step)
            b, gb = _step(plain, batch, seed=100 * epoch + step)
            for k in b:
                assert torch.equal(a[k], b[k]), (k, a[k], b[k])
            assert ga.keys() == gb.keys() and not any("bert" in k for k in ga)
            for k in gb:
                assert torch.equal(ga[k], gb[k]), k
            # BERT ran only on rows whose exact text was never seen (LNLN: erased rows are new texts)
            new = set()
            # DashFusion frozen_bert_width="batch": the width (the batch's longest text) is part of the key
            tag = (int(batch.text_lengths.max()),) if kw.get("frozen_bert_width") == "batch" else ()
            views = [batch] + ([batch.complete] if name == "lnln" and batch.complete is not None else [])
            for view in views:
                for i, idx in enumerate(view.index.tolist()):
                    text = ("complete", idx, *tag) if view is not batch or name != "lnln" or bool(
                        (view.text_ids[i] == batch.complete.text_ids[i]).all()) else ("erased", epoch, idx)
                    if text not in seen:
                        new.add(text)
            assert rows[0] - before == len(new), (epoch, step, rows[0] - before, len(new))
            seen |= new
    assert {t[:2] for t in seen if t[0] == "complete"} == {("complete", i) for i in range(n)}
    if name != "lnln" and "frozen_bert_width" not in kw:
        assert rows[0] == n  # each sample through BERT once over two epochs


def test_frozen_eval_forward_equals_the_fine_tunable_model_in_eval_mode():
    """Freezing changes no number of an eval forward (HME / LNLN / MMCL: the same BERT call; DashFusion with
    frozen_bert_width='batch')."""
    for name, kw in (("hme", {}), ("lnln", {}), ("mmcl", {}), ("dashfusion", {"frozen_bert_width": "batch"})):
        frozen = _build(name, seed=2, freeze_bert=True, **kw).eval()
        free = _build(name, seed=2, **kw).eval()
        free.load_state_dict(frozen.state_dict())
        batch = _batches(name, 1)[0]
        with torch.no_grad():
            a, b = frozen(batch), free(batch)
            a2 = frozen(batch)  # from the cache
        assert torch.equal(a["M"], b["M"]) and torch.equal(a2["M"], b["M"]), name
        if name != "mmcl":  # MMCL returns no BERT intermediate
            assert torch.equal(a["bert.last_hidden_state"], b["bert.last_hidden_state"]), name
