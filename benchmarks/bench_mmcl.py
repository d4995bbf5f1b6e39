"""MMCL training step: msa_fast (device replay ring, one composed backward) vs a straightforward eager
implementation of the official step (Python-list replay buffer, three sequential backward passes).

Both sides compute one official MMCL step on the same weights: task loss + model/actor update, replay push, critic
and actor updates from B sampled transitions, soft target updates. The eager side follows smwanghhh/MMCL
``train.py`` as released: per-modality gates and six similarity matmuls, a list of per-row tuples with the
drop-oldest-half rule, ``np.random.choice`` sampling copied row by row into fresh tensors, the critic target
evaluated with autograd (its loss back-propagates into the target networks, as the official code does), the actor
loss back-propagating into the critic too, non-fused Adam, a per-parameter soft-update loop over whole target
networks. msa_fast's side is ``MMCL.training_step`` + one backward + three fused Adam steps.

Tiny by default (CI runs each case once with ``--benchmark-disable``). ``MSA_FAST_BENCH_FULL=1`` = MOSI shapes
(L = 50 word-aligned, text features 768, audio 5, vision 20), d 128, FFN 2048, B = 16. For the table with the
ratio: ``python benchmarks/bench_mmcl.py [--batch-size 16] [--repeats 10] [--threads 2]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msa_fast.data.dataset import MMSADataset
from msa_fast.data.synthetic import synthetic
from msa_fast.models import build
from msa_fast.models.mmcl.layers import EncoderLayer
from msa_fast.train.optim import adam

FULL = os.environ.get("MSA_FAST_BENCH_FULL") == "1"
TINY = {"hidden_dim": 16, "heads": 2, "ffn_dim": 32, "replay_capacity": 64}


# ---- the eager baseline --------------------------------------------------------------------------------------
class ListReplayBuffer:
    """The official list buffer: per-row tuples, drop the oldest half when a push reaches the capacity."""

    def __init__(self, capacity: int):
        self.capacity, self.buffer = capacity, []

    def add_batch(self, rows: list) -> None:
        if len(self.buffer) + len(rows) >= self.capacity:
            del self.buffer[:len(self.buffer) // 2]
        self.buffer = self.buffer + rows

    def sample(self, n: int, like: torch.Tensor, action_like: torch.Tensor):
        picks = np.random.choice(len(self.buffer), n, replace=False)
        s = torch.zeros(n, *like.shape[1:])
        a = torch.zeros(n, *action_like.shape[1:])
        r = torch.zeros(n)
        s2 = torch.zeros(n, *like.shape[1:])
        for i, j in enumerate(picks):  # one copy per field and row, as the official sample_batch
            s[i], a[i], r[i], s2[i] = self.buffer[j]
        return s, a, r, s2


class EagerMMCL:
    """The official step, eager, on a copy of an ``MMCL`` model's weights (same function)."""

    def __init__(self, model, lr: float = 1e-5):
        net = copy.deepcopy(model.net)
        for m in net.modules():  # torch's own encoder layer forward (msa_fast's EncoderLayer has the same weights)
            if isinstance(m, EncoderLayer):
                m.__class__ = nn.TransformerEncoderLayer
        self.dec, self.actor, self.critic = net.model, net.actor, net.critic
        self.actor_target = copy.deepcopy(net.actor)  # official: a whole Actor, soft-updated entirely
        self.critic_target = copy.deepcopy(net.critic)
        for t in (self.actor_target, self.critic_target):
            t.requires_grad_(True)
        self.opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in (self.dec, self.actor, self.critic)]
        self.buffer = ListReplayBuffer(net.replay.capacity)
        self.w1, self.w2 = float(model.config["w1"]), 13.0
        self.last = None

    def encode(self, t, a, v):
        dec = self.dec
        t, a, v = dec.text_map(t), dec.audio_map(a), dec.vision_map(v)
        tn, an, vn = (F.normalize(x, p=2, dim=2) for x in (t, a, v))
        sim_t = torch.softmax(torch.min(tn @ an.transpose(1, 2), tn @ vn.transpose(1, 2)), -1)
        sim_a = torch.softmax(torch.min(an @ tn.transpose(1, 2), an @ vn.transpose(1, 2)), -1)
        sim_v = torch.softmax(torch.min(vn @ tn.transpose(1, 2), vn @ an.transpose(1, 2)), -1)
        shared = [self.attend(att, s @ x) for att, s, x in
                  ((dec.attention_text, sim_t, t), (dec.attention_audio, sim_a, a), (dec.attention_vision, sim_v, v))]
        diff = [torch.softmax(1 - s, -1) @ x for s, x in ((sim_t, t), (sim_a, a), (sim_v, v))]
        return torch.cat(shared, 1), torch.cat(diff, 1)

    @staticmethod
    def attend(att, x):
        b, n, d = x.shape
        q, k, v = (lin(x).view(b, n, att.heads, -1).permute(0, 2, 1, 3) for lin in (att.query, att.key, att.value))
        probs = torch.softmax(q @ k.transpose(-1, -2) / ((d // att.heads) ** 0.5), -1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(b, n, d)
        return att.norm(ctx + att.dense1(ctx))

    @staticmethod
    def act(actor, state):
        n = state.shape[1] // 3
        return torch.cat([m(state[:, i * n:(i + 1) * n]) for i, m in
                          enumerate((actor.text_action, actor.audio_action, actor.vision_action))], 1)

    def step(self, inputs, labels, next_inputs, next_labels) -> None:
        if self.last is None:
            shared, diff = self.encode(*inputs)
            self.last = (shared, diff, labels, diff.detach())
        shared, diff, y, state = self.last
        for opt in self.opts[:2]:
            opt.zero_grad()
        action = self.act(self.actor, state)
        pred = self.actor.predictor(shared, diff * action)[:, 0]
        loss = F.l1_loss(pred, y) * self.w1
        loss.backward()
        self.opts[0].step()
        self.opts[1].step()
        r = torch.exp(-(pred.detach() - y).abs())
        shared2, diff2 = self.encode(*next_inputs)
        state2 = diff2 * action
        self.buffer.add_batch(list(zip(state.data, action.data, r.data, state2.data)))
        b = state.shape[0]
        if len(self.buffer.buffer) > b:
            s, a, rr, s2 = self.buffer.sample(b, state, action)
            self.opts[2].zero_grad()
            target = self.critic_target(s2, self.act(self.actor_target, s2)) * 0.5 + rr  # not detached (official)
            critic_loss = F.l1_loss(self.critic(s, a), target) * self.w2
            critic_loss.backward()
            self.opts[2].step()
            self.opts[1].zero_grad()
            actor_loss = -self.critic(s, self.act(self.actor, s)).mean() * self.w2
            actor_loss.backward()
            self.opts[1].step()
            for tgt, src in ((self.critic_target, self.critic), (self.actor_target, self.actor)):
                for tp, p in zip(tgt.parameters(), src.parameters()):
                    tp.data.copy_(tp.data * (1.0 - 0.01) + p.data * 0.01)
        self.last = (shared2, diff2, next_labels, state2.data)


# ---- setup and timing ----------------------------------------------------------------------------------------
def setup(batch_size: int = 16, full: bool = FULL, seed: int = 0, n_batches: int = 4) -> dict[str, Any]:
    """An MMCL model (MOSI, text features) and ``n_batches`` aligned batches; both sides primed (replay > B)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    over = {"use_text_features": True, **({} if full else TINY)}
    model = build("mmcl", "mosi", **over).train()
    data = synthetic("mosi", n_train=batch_size * n_batches, n_valid=0, n_test=0, seed=seed, aligned=True,
                     text_features=True)
    ds = MMSADataset(data["train"], split="train")
    batches = [ds[list(range(i * batch_size, (i + 1) * batch_size))] for i in range(n_batches)]
    eager = EagerMMCL(model)
    opts = {name: adam(groups, lr=1e-5) for name, groups in model.optimizer_param_groups().items()}

    def fast_step(k: int) -> None:
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        model.training_step(batches[k % n_batches])["loss"].backward()
        for opt in opts.values():
            opt.step()

    def eager_step(k: int) -> None:
        a, b = batches[k % n_batches], batches[(k + 1) % n_batches]
        eager.step((a.text_features, a.audio, a.vision), a.labels, (b.text_features, b.audio, b.vision), b.labels)

    for k in range(3):  # prime: the replay holds > B transitions afterwards, every timed step runs the RL part
        fast_step(k)
        eager_step(k)
    assert len(model.net.replay) > batch_size and len(eager.buffer.buffer) > batch_size
    return {"fast": fast_step, "eager": eager_step, "model": model}


def time_steps(step, repeats: int) -> tuple[list[float], list[float]]:
    """(wall ms, process CPU ms) per step: on a shared machine the CPU time of a 1-thread run is the steadier."""
    wall, cpu = [], []
    for k in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        step(k)
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return wall, cpu


@pytest.fixture(scope="module")
def case():
    return setup(batch_size=16 if FULL else 4)


@pytest.mark.parametrize("side", ["fast", "eager"])
def test_mmcl_train_step(benchmark, case, side):
    benchmark.group = "mmcl-train-step"
    counter = iter(range(10**9))
    benchmark(lambda: case[side](next(counter)))
    assert all(torch.isfinite(p).all() for p in case["model"].parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny model instead of the official d 128 / FFN 2048")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    c = setup(args.batch_size, full=not args.tiny)
    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for _ in range(2):  # interleaved rounds: outside load hits both sides alike
        for side in ("eager", "fast"):
            w, t = time_steps(c[side], args.repeats)
            wall.setdefault(side, []).extend(w)
            cpu.setdefault(side, []).extend(t)
    print(f"MMCL train step, MOSI shapes, B={args.batch_size}, threads {torch.get_num_threads()}, "
          f"{'tiny' if args.tiny else 'd 128 / FFN 2048'} (median of {len(wall['fast'])} steps each):")
    for label, rows in (("wall", wall), ("process CPU", cpu)):
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"  {label:<12} eager (official step) {med['eager']:8.1f} ms  msa_fast {med['fast']:8.1f} ms  "
              f"speed-up {med['eager'] / med['fast']:.2f}x  (min {min(rows['eager']):.1f} / {min(rows['fast']):.1f})")


if __name__ == "__main__":
    main()
