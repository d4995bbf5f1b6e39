"""MMSADataset / collate / make_loader → Batch, split row access / iteration, and HME-style word alignment."""
import numpy as np
import pytest
import torch

from msa_fast.data import (Batch, MMSADataset, SplitRows, collate, concat_batches, iterate_batches, load_mmsa,
                            make_loader, select_rows, synthetic, word_align)
from parity_fixtures import parity_path


@pytest.fixture(scope="module")
def mosi():
    return synthetic("mosi", 21, 4, 4, seed=0)


def _assert_batches_equal(a: Batch, b: Batch):
    for name in ("text_ids", "text_attention_mask", "text_segment_ids", "audio", "vision", "audio_lengths",
                 "vision_lengths", "labels", "index", "text_features"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.ids == b.ids and a.raw_text == b.raw_text


def test_getitem_and_collate_agree(mosi):
    ds = MMSADataset(mosi["train"])
    assert len(ds) == 21
    rows = [3, 0, 20, 7]
    batch = ds[rows]
    _assert_batches_equal(batch, collate([ds[i] for i in rows]))
    d = mosi["train"]
    assert batch.text_ids.dtype == torch.int64 and batch.audio.dtype == torch.float32
    assert torch.equal(batch.index, torch.tensor(rows))
    np.testing.assert_array_equal(batch.text_ids.numpy(), d["text_bert"][rows, 0])
    np.testing.assert_array_equal(batch.text_bert.numpy(), d["text_bert"][rows])
    np.testing.assert_array_equal(batch.vision.numpy(), d["vision"][rows])
    np.testing.assert_array_equal(batch.labels.numpy(), d["regression_labels"][rows])
    assert batch.ids == [d["id"][i] for i in rows] and batch.raw_text[1] == d["raw_text"][0]
    assert torch.equal(batch.text_lengths, torch.as_tensor(d["text_bert"][rows, 1].sum(1)).long())
    assert torch.equal(batch.audio_padding_mask.sum(1), 375 - torch.as_tensor(d["audio_lengths"][rows]))
    assert batch.text_features.shape == (4, 50, 768) and batch.labels_unimodal is None
    with pytest.raises(IndexError):
        ds[21]
    with pytest.raises(ValueError):
        collate([])


def test_text_features_only_with_text_key(mosi):
    no_text = {k: v for k, v in mosi["valid"].items() if k != "text"}
    assert MMSADataset(no_text)[[0, 1]].text_features is None
    assert MMSADataset(mosi["valid"], use_text_features=False)[[0]].text_features is None
    with pytest.raises(ValueError, match="text"):
        MMSADataset(no_text, use_text_features=True)


def test_sims_unimodal_and_aligned_lengths():
    sims = synthetic("sims", 6, 2, 2, seed=1)
    b = MMSADataset(sims["train"])[[1, 2]]
    assert set(b.labels_unimodal) == {"T", "A", "V"}
    np.testing.assert_array_equal(b.labels_unimodal["V"].numpy(), sims["train"]["regression_labels_V"][[1, 2]])
    aligned = synthetic("mosi", 5, 2, 2, aligned=True)
    b = MMSADataset(aligned["train"])[[0, 4]]
    assert torch.equal(b.audio_lengths, torch.tensor([50, 50])) and b.audio.shape == (2, 50, 5)


def test_dataset_validates(mosi):
    bad = dict(mosi["test"], audio=mosi["test"]["audio"][:2])
    with pytest.raises(ValueError, match="key 'audio'"):
        MMSADataset(bad, split="test")
    validated = load_mmsa(mosi)["test"]
    assert len(MMSADataset(validated, validate=False)) == 4


def test_make_loader_order_and_seed(mosi):
    seq = list(make_loader(mosi["train"], batch_size=8))
    assert [b.batch_size for b in seq] == [8, 8, 5]
    assert torch.equal(torch.cat([b.index for b in seq]), torch.arange(21))
    a = make_loader(mosi["train"], batch_size=8, shuffle=True, seed=3)
    b = make_loader(mosi["train"], batch_size=8, shuffle=True, seed=3)
    epoch0_a, epoch0_b = [x.index for x in a], [x.index for x in b]
    assert all(torch.equal(x, y) for x, y in zip(epoch0_a, epoch0_b))
    assert sorted(torch.cat(epoch0_a).tolist()) == list(range(21))
    epoch1_a = torch.cat([x.index for x in a])
    assert not torch.equal(epoch1_a, torch.cat(epoch0_a))  # the generator advances per epoch
    assert [x.batch_size for x in make_loader(mosi["train"], 8, drop_last=True)] == [8, 8]
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(mosi["train"], 0)
    batch = next(iter(a))
    d = mosi["train"]
    np.testing.assert_array_equal(batch.audio.numpy(), d["audio"][batch.index.numpy()])


def test_batch_to_device(mosi):
    b = MMSADataset(mosi["valid"])[[0, 1]]
    m = b.to("meta")
    assert m.audio.device.type == "meta" and m.text_features.device.type == "meta" and m.ids == b.ids


# ---- split row access / iteration (SplitRows, iterate_batches) --------------------------------------------------
def test_split_rows_and_iterate_batches_agree_for_every_form_of_the_split(mosi):
    ds = MMSADataset(mosi["train"])
    whole = ds[list(range(21))]
    shuffled = list(make_loader(ds, batch_size=5, shuffle=True, seed=1))
    forms = {"dataset": lambda: ds, "dict": lambda: mosi["train"], "loader": lambda: make_loader(ds, 4, shuffle=True),
             "batch": lambda: whole, "shuffled batches": lambda: shuffled, "generator": lambda: iter(shuffled)}
    rows = torch.tensor([20, 3, 3, 0])
    for name, data in forms.items():
        split = SplitRows(data())
        assert len(split) == 21, name
        _assert_batches_equal(split.rows(rows), ds[rows.tolist()])
        got = list(iterate_batches(data(), batch_size=8, device="cpu"))
        assert [b.batch_size for b in got] == [8, 8, 5], name
        _assert_batches_equal(concat_batches(got), whole)


def test_select_rows_and_concat_batches(mosi):
    ds = MMSADataset(mosi["train"])
    b = ds[[0, 1, 2, 3]]
    _assert_batches_equal(select_rows(b, torch.tensor([2, 0])), ds[[2, 0]])
    narrow = b.replace(text_ids=b.text_ids[:, :5], text_attention_mask=b.text_attention_mask[:, :5],
                       text_segment_ids=b.text_segment_ids[:, :5], text_features=b.text_features[:, :5])
    joined = concat_batches([b, narrow])
    assert joined.batch_size == 8 and joined.text_ids.shape == (8, b.text_ids.shape[1])
    assert (joined.text_ids[4:, 5:] == 0).all() and (joined.text_features[4:, 5:] == 0).all()
    assert joined.ids == b.ids * 2


def test_split_rows_bad_input(mosi):
    ds = MMSADataset(mosi["train"])
    with pytest.raises(ValueError, match="permutation"):
        SplitRows([ds[[0, 1]], ds[[1, 2]]])
    with pytest.raises(TypeError, match="Batch"):
        SplitRows(3)
    with pytest.raises(TypeError, match="iterate to Batch"):
        SplitRows([])
    with pytest.raises(TypeError, match="iterate to Batch"):
        SplitRows([1, 2])
    with pytest.raises(ValueError, match="batch_size"):
        list(iterate_batches(ds, batch_size=0))
    with pytest.raises(ValueError, match="at least one"):
        concat_batches([])


# ---- word alignment ---------------------------------------------------------------------------------------
def _word_align_loop(x, lengths, text_lengths, out_len):
    """Reference: numpy.array_split + float64 mean per word, HME row layout."""
    n, _, d = x.shape
    out = np.zeros((n, out_len, d))
    for i in range(n):
        words = int(text_lengths[i]) - 2
        if words <= 0:
            continue
        for w, chunk in enumerate(np.array_split(x[i, : int(lengths[i])].astype(np.float64), words)):
            if w < out_len - 2 and len(chunk):
                out[i, w + 1] = chunk.mean(0)
    return out


def test_word_align_matches_array_split():
    rng = np.random.default_rng(0)
    n, L, D = 9, 37, 3
    x = rng.standard_normal((n, L, D)).astype(np.float32)
    lengths = np.array([37, 1, 0, 20, 5, 36, 13, 30, 7])
    text_lengths = np.array([12, 6, 5, 2, 10, 3, 14, 40, 9])  # 5 < 10 words in row 4 (empty chunks), row 3: no word
    for i, ln in enumerate(lengths):
        x[i, ln:] = 0
    got = word_align(x, lengths, text_lengths, out_len=12)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (n, 12, D)
    np.testing.assert_allclose(got, _word_align_loop(x, lengths, text_lengths, 12), rtol=1e-6, atol=1e-6)
    assert np.isfinite(got).all()


def test_word_align_torch_noncontiguous_float64():
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.standard_normal((4, 3, 25))).transpose(1, 2)  # (4, 25, 3) non-contiguous
    lengths = torch.tensor([25, 10, 3, 17])
    tl = torch.tensor([7, 8, 4, 50])
    got = word_align(base, lengths, tl, out_len=8)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float64
    x = base.numpy().copy()
    for i, ln in enumerate(lengths.tolist()):
        x[i, ln:] = 0
    np.testing.assert_allclose(got.numpy(), _word_align_loop(x, lengths.numpy(), tl.numpy(), 8), atol=1e-12)


def test_word_align_matches_hme_fixture():
    path = str(parity_path("hme_mosi.pt"))
    import os

    if not os.path.exists(path):
        pytest.skip("parity fixture not available")
    fx = torch.load(path, weights_only=True, mmap=True)["inputs_mmsa"]
    tl = fx["text_bert"][:, 1].sum(1).long()
    for m in ("audio", "vision"):
        got = word_align(fx[m], fx[f"{m}_lengths"], tl, out_len=50)
        torch.testing.assert_close(got, fx[f"{m}_aligned"], rtol=1e-5, atol=1e-6)


def test_word_align_errors():
    with pytest.raises(ValueError, match="features"):
        word_align(np.zeros((2, 3)), [1, 1], [3, 3])
    with pytest.raises(ValueError, match="lengths"):
        word_align(np.zeros((2, 3, 1), np.float32), [1, 9], [3, 3])
    with pytest.raises(ValueError, match="shape"):
        word_align(np.zeros((2, 3, 1), np.float32), [1], [3, 3])
