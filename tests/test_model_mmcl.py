"""MMCL (reconstruction): layers against the official formulas, the one-backward objective (gradient isolation per
optimizer, MDP transitions, soft updates), bug flags, the device replay ring, exact resume, alignment handling,
missing modalities, per-optimizer settings in the trainer, and the IEMOCAP setting."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msa_fast.data.dataset import MMSADataset
from msa_fast.data.missing import PatternAvailability
from msa_fast.models import build
from msa_fast.models.base import MSAModel
from msa_fast.models.mmcl.iemocap import (EMOTIONS, MMCLIemocap, emotion_reward, iemocap_metrics, load_iemocap,
                                          synthetic_iemocap, train_iemocap)
from msa_fast.models.mmcl.layers import ActionGates, Critic, Decoupler, EncoderLayer, SelfAttention
from msa_fast.models.mmcl.model import pool_frames, regression_reward
from msa_fast.models.mmcl.replay import ReplayRing
from msa_fast.models.registry import register
from msa_fast.train import OptimizerSet, TrainConfig, Trainer, load_data, smoke_model_overrides

TINY = smoke_model_overrides("mmcl")


def _data(aligned: bool = True, n_train: int = 48, n_eval: int = 16, dataset: str = "mosi"):
    return load_data("synthetic", dataset, seed=0, aligned=aligned, n_train=n_train, n_valid=n_eval, n_test=n_eval)


def _batches(data, b: int = 8, k: int = 4):
    ds = MMSADataset(data["train"], split="train")
    return [ds[list(range(i * b, (i + 1) * b))] for i in range(k)]


def _model(seed: int = 0, **over):
    torch.manual_seed(seed)
    return build("mmcl", "mosi", **{**TINY, **over})


@pytest.fixture(scope="module")
def aligned():
    return _data(aligned=True)


# ---- layers vs the official formulas --------------------------------------------------------------------------
def _official_decouple(t, a, v):
    """network.py Model.similarity_matrix + map_to_subspace (before attention), six matmuls."""
    tn, an, vn = (F.normalize(x, p=2, dim=2) for x in (t, a, v))
    mm = lambda x, y: x @ y.transpose(1, 2)  # noqa: E731
    sims = [torch.softmax(torch.min(mm(tn, an), mm(tn, vn)), -1), torch.softmax(torch.min(mm(an, tn), mm(an, vn)), -1),
            torch.softmax(torch.min(mm(vn, tn), mm(vn, an)), -1)]
    common = [s @ x for s, x in zip(sims, (t, a, v))]
    specific = [torch.softmax(1 - s, -1) @ x for s, x in zip(sims, (t, a, v))]
    return common, specific


def _official_self_attention(att: SelfAttention, x):
    b, n, d = x.shape
    h = att.heads
    q, k, v = (lin(x).view(b, n, h, d // h).permute(0, 2, 1, 3) for lin in (att.query, att.key, att.value))
    ctx = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1) @ v).permute(0, 2, 1, 3).reshape(b, n, d)
    return att.norm(ctx + att.dense1(ctx))


def test_decoupler_matches_the_official_formulas():
    torch.manual_seed(0)
    dec = Decoupler((12, 5, 7), hidden=16, heads=4).double().eval()
    t, a, v = torch.randn(3, 10, 12).double(), torch.randn(3, 10, 5).double(), torch.randn(3, 10, 7).double()
    shared, diff = dec(t, a, v)
    assert shared.shape == diff.shape == (3, 30, 16)
    mt, ma, mv = dec.text_map(t), dec.audio_map(a), dec.vision_map(v)
    common, specific = _official_decouple(mt, ma, mv)
    attns = (dec.attention_text, dec.attention_audio, dec.attention_vision)
    ref_shared = torch.cat([_official_self_attention(att, c) for att, c in zip(attns, common)], 1)
    torch.testing.assert_close(shared, ref_shared, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diff, torch.cat(specific, 1), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="one shared sequence length"):
        dec(t, a[:, :9], v)


def test_gates_and_critic_match_the_official_formulas():
    torch.manual_seed(0)
    gates = ActionGates(8).double()
    state = torch.randn(4, 15, 8).double()
    ref = torch.cat([m(state[:, i * 5:(i + 1) * 5]) for i, m in
                     enumerate((gates.text_action, gates.audio_action, gates.vision_action))], 1)
    torch.testing.assert_close(gates(state), ref)
    critic = Critic(8, 2, ffn_dim=16).double().eval()
    action = torch.rand(4, 15, 1).double()
    x = torch.cat([state, action.repeat(1, 1, 2)], -1)  # official: action repeated n_head times
    encoders = (critic.critic_t, critic.critic_a, critic.critic_v)
    pooled = [enc(x[:, i * 5:(i + 1) * 5]).mean(1) for i, enc in enumerate(encoders)]
    torch.testing.assert_close(critic(state, action), critic.proj(torch.cat(pooled, -1)).squeeze(-1))
    # official quirk: the three encoders are deep copies of ONE layer → identical initial weights
    assert torch.equal(critic.critic_t.layers[0].linear1.weight, critic.critic_v.layers[0].linear1.weight)


@pytest.mark.parametrize("width", [16, 18])  # actor (d) and critic (d + heads) widths
def test_encoder_layer_is_torchs_function(width):
    torch.manual_seed(0)
    mine = EncoderLayer(width, 2, dim_feedforward=24, dropout=0.0, batch_first=True).double()
    ref = nn.TransformerEncoderLayer(width, 2, dim_feedforward=24, dropout=0.0, batch_first=True).double()
    ref.load_state_dict(mine.state_dict())  # same keys as torch's layer (official state_dicts load)
    x = torch.randn(3, 7, width, dtype=torch.double, requires_grad=True)
    out, expected = mine(x), ref(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(torch.autograd.grad(out.square().sum(), x)[0],
                               torch.autograd.grad(expected.square().sum(), x)[0])


def test_shapes_and_outputs(aligned):
    model = _model()
    batch = _batches(aligned)[0]
    out = model.eval()(batch)
    assert out["M"].shape == (8,) and out["action"].shape == (8, 150, 1)
    assert out["shared"].shape == out["diff"].shape == (8, 150, 16)
    assert ((out["action"] > 0) & (out["action"] < 1)).all()
    model.train()
    losses = model.training_step(batch)
    assert set(losses) == {"loss", "task", "critic", "actor", "M"} and losses["M"].shape == (8,)


def test_registry_entry_says_reconstruction():
    from msa_fast.models_cli import describe_model
    from msa_fast.models.registry import get_model_class

    from msa_fast.models_cli import lines

    cls = get_model_class("mmcl")
    assert "reconstruction" in cls.provenance
    assert "RECONSTRUCTION" in describe_model(cls)
    assert any("provenance: reconstruction" in line for line in lines())


# ---- the objective --------------------------------------------------------------------------------------------
def _run_until_rl(model, batches):
    """Training steps (no optimizer) until the replay ring holds more than B transitions."""
    for b in batches:
        out = model.training_step(b)
    return out


def test_transitions_are_the_official_mdp(aligned):
    model = _model(replay_capacity=64).train()
    b0, b1 = _batches(aligned)[:2]
    torch.manual_seed(1)
    model.training_step(b0)
    s0, a0, r0 = (model.net._pending[k].clone() for k in ("state", "action", "reward"))
    with torch.no_grad():
        _, diff0 = model.net.model(*model.inputs(b0))
        _, diff1 = model.net.model(*model.inputs(b1))
    torch.testing.assert_close(s0, diff0)  # very first batch: its own diff
    model.training_step(b1)
    ring = model.net.replay
    assert len(ring) == 8
    torch.testing.assert_close(ring.states[:8], s0)
    torch.testing.assert_close(ring.actions[:8], a0)
    torch.testing.assert_close(ring.rewards[:8], r0)
    torch.testing.assert_close(ring.next_states[:8], diff1 * a0)  # next batch's diff gated by the current action
    torch.testing.assert_close(model.net._pending["state"], diff1 * a0)  # ... which is the next step's state


def test_unequal_batch_sizes_wrap_rows(aligned):
    model = _model().train()
    ds = MMSADataset(aligned["train"], split="train")
    model.training_step(ds[list(range(8))])
    a0 = model.net._pending["action"].clone()
    small = ds[list(range(8, 11))]
    model.training_step(small)
    with torch.no_grad():
        _, diff1 = model.net.model(*model.inputs(small))
    torch.testing.assert_close(model.net.replay.next_states[:8], diff1[torch.arange(8) % 3] * a0)
    torch.testing.assert_close(model.net._pending["state"], diff1 * a0[:3])


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_land_only_on_their_optimizer(aligned):
    model = _model().train()
    batches = _batches(aligned)
    for b in batches[:3]:
        model.training_step(b)
    shared, diff = model.net.model(*model.inputs(batches[3]))
    out = model.net.objective(shared, diff, lambda p: model._task_loss(p[:, 0], batches[3].labels),
                              lambda p: regression_reward(p[:, 0], batches[3].labels))
    assert out["critic"] > 0 and out["actor"] != 0  # the RL part ran
    groups = {k: {id(p) for g in v for p in g["params"]} for k, v in model.optimizer_param_groups().items()}
    names = {n: next((k for k, ids in groups.items() if id(p) in ids), None) for n, p in model.named_parameters()}
    task, critic, actor = (_grads(model, out[k]) for k in ("task", "critic", "actor"))
    assert {names[n] for n in task} == {"model", "actor"}
    assert {names[n] for n in critic} == {"critic"}
    assert actor and {names[n] for n in actor} == {"actor"}
    assert all(n.startswith("net.actor.") and "_action" in n for n in actor)  # only the gates
    everything = _grads(model, out["loss"])
    assert not any("target" in n for n in everything)
    assert all(names[n] is not None for n in everything)
    # the critic's gradient of the total is exactly the critic loss's (the actor loss leaves it alone)
    model.zero_grad(set_to_none=True)
    out["loss"].backward(retain_graph=True)
    total_grad = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("net.critic.")}
    model.zero_grad(set_to_none=True)
    out["critic"].backward()
    for n, p in model.named_parameters():
        if n.startswith("net.critic.") and p.grad is not None:
            torch.testing.assert_close(total_grad[n], p.grad)


def test_soft_update_runs_at_the_next_step(aligned):
    model = _model().train()
    batches = _batches(aligned)
    for b in batches[:3]:
        model.training_step(b)
    assert model.net._target_update_due
    with torch.no_grad():
        for p in model.net.critic.parameters():
            p.add_(1.0)  # as if the optimizer stepped
    before = [p.clone() for p in model.net.critic_target.parameters()]
    model.training_step(batches[3])
    for t, old, p in zip(model.net.critic_target.parameters(), before, model.net.critic.parameters()):
        torch.testing.assert_close(t, 0.99 * old + 0.01 * p)


# ---- bug flags ------------------------------------------------------------------------------------------------
def test_independent_target_init_flag():
    fixed, buggy = _model(seed=3), _model(seed=3, independent_target_init=True)
    for (n, a), (_, b) in zip(fixed.net.critic.state_dict().items(), buggy.net.critic.state_dict().items()):
        assert torch.equal(a, b), n  # online networks identical: only the targets differ
    for a, b in zip(fixed.net.critic_target.parameters(), fixed.net.critic.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(fixed.net.actor_target.parameters(), fixed.net.actor.gate_parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(buggy.net.critic_target.parameters(),
                                                     buggy.net.critic.parameters()))
    assert not all(p.requires_grad for p in buggy.net.critic_target.parameters())


def test_misaligned_reward_is_the_official_gather():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 8), torch.randint(0, 2, (3, 4))
    probs = torch.softmax(logits.view(3, 4, 2), -1)
    right = torch.stack([sum(probs[i, e, labels[i, e]] for e in range(4)) for i in range(3)])
    torch.testing.assert_close(emotion_reward(logits, labels), right)
    flat = probs.view(12, 2)  # row i = sample i // 4, emotion i % 4
    wrong = torch.stack([sum(flat[i, labels[i, e]] for e in range(4)) for i in range(3)])
    torch.testing.assert_close(emotion_reward(logits, labels, misaligned=True), wrong)
    assert not torch.allclose(right, wrong)


def test_regression_rewards():
    pred, y = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([0.5, 1.0, 1.0])
    torch.testing.assert_close(regression_reward(pred, y), torch.exp(-torch.tensor([0.5, 0.0, 3.0])))
    torch.testing.assert_close(regression_reward(pred, y, "neg_abs"), -torch.tensor([0.5, 0.0, 3.0]))
    with pytest.raises(ValueError, match="reward"):
        build("mmcl", "mosi", **{**TINY, "reward": "nope"})


# ---- replay ring ----------------------------------------------------------------------------------------------
def _transitions(n, start):
    s = torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1).expand(n, 3, 2).clone()
    return s, s[..., :1] * 0.5, s[:, 0, 0], s + 1000


@pytest.mark.parametrize("overflow", ["drop_half", "ring"])
def test_ring_matches_the_list_buffer(overflow):
    ring, ref, start, wrapped = ReplayRing(10, overflow, seed=0), [], 0, False
    for n in (3, 4, 2, 5, 1, 4, 5, 3, 2, 5, 5):
        ring.push(*_transitions(n, start))
        new = list(range(start, start + n))
        if overflow == "drop_half":  # Co-SA utils.ReplayBuffer.add_batch
            if len(ref) + n >= 10:
                del ref[:len(ref) // 2]
            ref += new
        else:
            ref = (ref + new)[-10:]
        start += n
        logical = (torch.arange(ring.count) + ring.head) % ring.capacity
        assert ring.rewards[logical].long().tolist() == ref
        assert torch.equal(ring.next_states[logical][:, 0, 0], torch.tensor(ref, dtype=torch.float32) + 1000)
        wrapped |= ring.head + ring.count > ring.capacity
    assert wrapped  # the logical window crossed the end of the storage


def test_ring_sampling_is_seeded_distinct_and_resumable():
    def filled(seed):
        ring = ReplayRing(16, seed=seed)
        ring.push(*_transitions(6, 0))
        ring.push(*_transitions(6, 6))
        return ring

    a, b, c = filled(1), filled(1), filled(2)
    sa = [a.sample(5)[2] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(sa, [b.sample(5)[2] for _ in range(3)]))
    assert not all(torch.equal(x, y) for x, y in zip(sa, [c.sample(5)[2] for _ in range(3)]))
    assert all(len(set(x.tolist())) == 5 for x in sa)  # without replacement
    state = a.state()
    d = ReplayRing(16, seed=99)
    d.load_state(pickle.loads(pickle.dumps(state)))
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.sample(4), d.sample(4)))
    with pytest.raises(ValueError, match="replay_capacity"):
        a.push(*_transitions(9, 0))
    with pytest.raises(ValueError, match="cannot sample"):
        ReplayRing(16).sample(1)


# ---- exact resume and the trainer ---------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _fit(data, ckpt, resume=False, kill_after=None, epochs=3):
    torch.manual_seed(1111)
    model = build("mmcl", "mosi", **{**TINY, "plateau_actor": 0, "plateau_critic": 0})
    cfg = TrainConfig(epochs=epochs, batch_size=16, eval_batch_size=16, quiet=True, seed=1111, early_stop=epochs,
                      key_eval="MAE", lr=1e-3, warmup_epochs=0, checkpoint_dir=ckpt, resume=resume)

    def stop(trainer, epoch, record):
        if epoch == kill_after:
            raise _Stop

    trainer = Trainer(model, data["train"], data["valid"], data["test"], cfg, on_epoch_end=stop)
    try:
        return trainer, trainer.fit()
    except _Stop:
        return trainer, None


def test_resume_is_exact_with_buffer_generator_and_plateaus(aligned, tmp_path):
    straight, full = _fit(aligned, str(tmp_path / "a"))
    _fit(aligned, str(tmp_path / "b"), kill_after=1)
    torch.manual_seed(5)
    resumed, res = _fit(aligned, str(tmp_path / "b"), resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(res["history"]) == strip(full["history"])
    assert res["test"] == full["test"]
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    ra, rb = straight.model.net.replay, resumed.model.net.replay
    assert (ra.count, ra.head) == (rb.count, rb.head) and ra.count > 16
    assert torch.equal(ra.states, rb.states)
    assert torch.equal(ra.generator.get_state(), rb.generator.get_state())
    assert straight.optim.state_dict()["plateaus"] == resumed.optim.state_dict()["plateaus"]
    assert sorted(straight.optim.plateaus) == ["actor", "critic", "model"]
    assert all(isinstance(o, torch.optim.Adam) and not isinstance(o, torch.optim.AdamW)
               for o in straight.optim.optimizers.values())
    last = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert last["epoch_state"]["replay"]["count"] == ra.count


@register("dummy_plateau")
class _ConstantWithPlateau(MSAModel):
    """Predicts a learned constant whose loss never changes on valid (zero gradient): the plateau must reduce."""

    CONFIGS = {"common": {"batch_size": 16}, "mosi": {}}

    def __init__(self, config):
        super().__init__(config)
        self.c = nn.Parameter(torch.zeros(1))
        self.other = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return {"M": self.c.expand(batch.batch_size) * 0 + self.other * 0}

    def loss(self, batch, outputs):
        return {"loss": (outputs["M"] - batch.labels).abs().mean()}

    def optimizer_param_groups(self):
        return {"a": [{"params": [self.c]}], "b": [{"params": [self.other]}]}

    def optimizer_settings(self):
        return {"a": {"optimizer": "adam", "plateau": {"patience": 0, "factor": 0.5}}}


def test_trainer_steps_plateau_schedulers_once_per_epoch(aligned):
    cfg = TrainConfig(epochs=3, batch_size=16, quiet=True, early_stop=5, lr=1e-3)
    trainer = Trainer(build("dummy_plateau", "mosi"), aligned["train"], aligned["valid"], None, cfg)
    assert isinstance(trainer.optim.optimizers["a"], torch.optim.Adam)
    assert isinstance(trainer.optim.optimizers["b"], torch.optim.AdamW)
    assert sorted(trainer.optim.schedulers) == ["b"] and sorted(trainer.optim.plateaus) == ["a"]
    history = trainer.fit()["history"]
    assert [r["lr"] for r in history] == [1e-3, 5e-4, 2.5e-4]  # epoch 1 sets the best, then no improvement
    assert trainer.optim.optimizers["b"].param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="plateau"):
        Trainer(build("dummy_plateau", "mosi"), aligned["train"], aligned["valid"], None,
                TrainConfig(epochs=3, batch_size=16, quiet=True, lr_schedule="cosine"))


def test_optimizer_settings_are_checked():
    class Bad(_ConstantWithPlateau):
        def optimizer_settings(self):
            return {"c": {"optimizer": "adam"}}

    with pytest.raises(ValueError, match="does not declare"):
        OptimizerSet(Bad({"dataset": "mosi"}), TrainConfig(dataset="mosi").resolve({}), 1)


# ---- alignment and missing data -----------------------------------------------------------------------------
def test_unaligned_data_is_a_clear_error_or_aligned_on_request():
    data = _data(aligned=False, n_train=16, n_eval=4)
    batch = _batches(data, b=4, k=1)[0]
    with pytest.raises(ValueError, match="alignment='word_align'"):
        _model()(batch)
    for mode in ("word_align", "pool"):
        model = _model(alignment=mode)
        out = model.eval()(batch)
        assert out["action"].shape == (4, 150, 1) and torch.isfinite(out["M"]).all()
        model.train().training_step(batch)["loss"].backward()
    aligned_batch = _batches(_data(aligned=True, n_train=16, n_eval=4), b=4, k=1)[0]
    model = _model(alignment="word_align")
    t, a, v = model.inputs(aligned_batch)
    assert a is aligned_batch.audio  # already L_t long: taken as aligned


def test_pool_frames_averages_near_equal_chunks():
    x = torch.arange(2 * 7 * 1, dtype=torch.float32).view(2, 7, 1)
    out = pool_frames(x, torch.tensor([7, 5]), 3)
    # sample 0: chunks [0,1,2] [3,4] [5,6]; sample 1 (5 valid): [7,8] [9,10] [11]
    torch.testing.assert_close(out[..., 0], torch.tensor([[1.0, 3.5, 5.5], [7.5, 9.5, 11.0]]))


@pytest.mark.parametrize("pattern", ["T", "A", "V"])
def test_fully_missing_modality_gives_no_nan_with_the_rl_part(aligned, pattern):
    model = _model().train()
    batches = [PatternAvailability(pattern=pattern)(b, epoch=0, split="train") for b in _batches(aligned)]
    out = _run_until_rl(model, batches)
    assert out["critic"] > 0
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---- IEMOCAP -------------------------------------------------------------------------------------------------
def test_iemocap_loader_reads_the_pickle_layout(tmp_path):
    raw = synthetic_iemocap(n_train=10, n_valid=4, n_test=4, seed=0, neg_inf_rate=0.05)
    assert raw["train"]["text"].shape == (10, 20, 300) and raw["train"]["audio"].shape == (10, 20, 74)
    assert raw["train"]["vision"].shape == (10, 20, 35) and raw["train"]["labels"].shape == (10, 4, 2)
    assert np.isneginf(raw["train"]["audio"]).any()
    path = tmp_path / "iemocap_data.pkl"
    path.write_bytes(pickle.dumps(raw))
    data = load_iemocap(str(path))  # restricted unpickler
    assert torch.isfinite(data["train"]["audio"]).all()
    assert torch.equal(data["valid"]["labels"], torch.from_numpy(raw["valid"]["labels"].argmax(-1)))
    bad = {k: dict(v) for k, v in raw.items()}
    bad["test"]["vision"] = bad["test"]["vision"][:, :15]
    with pytest.raises(ValueError, match="one shared sequence length"):
        load_iemocap(bad)
    bad["test"] = {k: v for k, v in raw["test"].items() if k != "labels"}
    with pytest.raises(ValueError, match="lacks keys"):
        load_iemocap(bad)


def test_iemocap_metrics_per_emotion():
    labels = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]])
    pred = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    logits = F.one_hot(pred, 2).float() * 3.0  # (4, 4, 2)
    m = iemocap_metrics(logits.view(4, 8), labels)
    assert m["acc_neutral"] == 0.75 and m["acc_happy"] == 0.75 and m["acc_sad"] == 0.75 and m["acc_angry"] == 0.75
    # neutral: truth [0,1,0,0], pred [0,1,0,1] → class 0: P 1, R 2/3, F1 0.8 (support 3); class 1: P .5 R 1, F1 2/3
    assert m["f1_neutral"] == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)
    assert m["acc_mean"] == 0.75 and set(EMOTIONS) <= {k.split("_")[1] for k in m if "_" in k}


def test_iemocap_training_runs_learns_and_loads_official_keys():
    data = load_iemocap(synthetic_iemocap(n_train=64, n_valid=32, n_test=32, seed=1))
    small = dict(hidden_dim=16, heads=2, ffn_dim=32, replay_capacity=64)
    res = train_iemocap(data, epochs=3, batch_size=16, lr=1e-3, seed=0, **small)
    assert res["best_epoch"] in (1, 2, 3) and len(res["history"]) == 3
    assert res["history"][-1]["valid_loss"] < res["history"][0]["valid_loss"] + 0.05
    assert {"acc_happy", "f1_angry", "acc_mean", "f1_mean"} <= set(res["test"])
    assert len(res["model"].net.replay) > 16  # the RL part ran
    leaky = train_iemocap(data, epochs=2, batch_size=16, lr=1e-3, seed=0, select_on="test_per_metric", **small)
    assert leaky["best_epoch"] is None and "acc_neutral" in leaky["test"]
    # an official checkpoint {"model": Model.state_dict(), "actor": Actor.state_dict()} loads by key
    model = res["model"]
    saved = {"model": model.net.model.state_dict(), "actor": model.net.actor.state_dict()}
    other = MMCLIemocap(**small)
    other.load_official_state_dict(saved)
    other.eval(), model.eval()
    x = [data["test"][m][:4] for m in ("text", "audio", "vision")]
    torch.testing.assert_close(other(*x), model(*x))
    with pytest.raises(ValueError, match="unknown"):
        MMCLIemocap(nope=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_iemocap(data, epochs=1, batch_size=128, **small)


def test_batch_larger_than_half_the_buffer_is_refused(aligned):
    model = _model(replay_capacity=10).train()
    batches = _batches(aligned)
    model.training_step(batches[0])
    with pytest.raises(ValueError, match="replay_capacity"):
        model.training_step(batches[1])
