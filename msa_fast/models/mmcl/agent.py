"""The MMCL learner shared by the MSA model (``model.py``) and the IEMOCAP setting (``iemocap.py``): decoupling
module, actor, critic, target networks, replay ring and the carried MDP state, composed into ONE objective.

The official step (smwanghhh/MMCL ``train.py::train_epoch``) for batch k, with state s_k carried from step k − 1:
a_k = actor(s_k); pred = actor.predictor(shared_k, diff_k ⊙ a_k); task loss → step model + actor; reward r_k;
encode batch k+1, s_{k+1} = diff_{k+1} ⊙ a_k (the current action applied position-wise to the NEXT batch's
samples); push (s_k, a_k, r_k, s_{k+1}); if the buffer holds > B transitions: sample B, critic loss
w2·L1(Q(s, a), r + 0.5·Q'(s', μ'(s'))) → step critic; actor loss −w2·mean Q(s, μ(s)) → step actor; soft target
updates (τ = 0.01).

A model here sees one batch per call, so the transition of batch k is completed (and pushed) in the call for batch
k+1, whose fresh encoding diff_{k+1} (with the weights after step k, as the official one) gives s_{k+1}. The buffer
therefore holds exactly the official transitions; the critic/actor update that officially closes step k runs in
the call for batch k+1, before its task loss. The trainer does one backward and steps every optimizer, so:

- ``loss = task + critic + actor`` where task reaches the model and actor parameters (official), the critic loss
  only the critic (its inputs are replayed constants, the target under ``no_grad``), and the actor loss only the
  actor's gates (the critic is evaluated with detached parameters through ``torch.func.functional_call``);
- the three updates use the weights at the start of the step (officially sequential) and the actor's two updates
  (task, then −Q) are one Adam step on the summed gradient;
- the soft target update of a step runs at the start of the next call (after the optimizers stepped), so every
  target evaluation sees the official target weights; the "update due" flag is checkpointed.

Target networks run in train mode as in the official code (their BatchNorm uses batch statistics and dropout is on);
only parameters are soft-updated (official ``zip(target.parameters(), ...)``). Only the actor's gates have a target
(the official ``actor_target`` is a whole Actor of which only ``forward`` — the gates — ever runs).

Batches of unequal size (the trainer keeps the last short batch; the official loader drops it): rows wrap around,
s_{k+1}[i] = diff_{k+1}[i mod B_{k+1}] ⊙ a_k[i] for the pushed transition and s_{k+1}[j] = diff_{k+1}[j] ⊙
a_k[j mod B_k] for the next step's state — the official pairing whenever the sizes are equal.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .layers import ActionGates, Actor, Critic, Decoupler, frozen_copy
from .replay import ReplayRing

#: Defaults of the official code (train.py argparse), shared by the MSA and IEMOCAP configurations.
NET_DEFAULTS: dict[str, Any] = {
    "hidden_dim": 128,  # emb_size
    "heads": 4,  # n_head
    "ffn_dim": 2048,  # nn.TransformerEncoderLayer default in actor / critic encoders
    "dropout": 0.5,
    "atten_dropout": 0.0,
    "w1": 7.0,  # task loss weight
    "w2": 13.0,  # critic / actor loss weight
    "discount": 0.5,
    "tau": 0.01,
    "replay_capacity": 1000,
    "replay_overflow": "drop_half",
    "replay_seed": None,  # None: torch.initial_seed() when the model is built (the run seed)
    "independent_target_init": False,  # official bug: targets initialised independently, not copied
}


def _wrap_rows(x: Tensor, n: int) -> Tensor:
    """Rows i mod len(x), i < n (x itself when the sizes agree)."""
    if x.shape[0] == n:
        return x
    return x.index_select(0, torch.arange(n, device=x.device) % x.shape[0])


class MMCLNet(nn.Module):
    """Decoupler (``model``), ``actor``, ``critic``, ``actor_target`` (gates), ``critic_target``, ``replay``.

    dims: (D_t, D_a, D_v) input feature sizes; out_dim: predictor outputs (1 regression, 8 IEMOCAP).
    """

    def __init__(self, dims: Sequence[int], out_dim: int, config: Mapping[str, Any]):
        super().__init__()
        c = {**NET_DEFAULTS, **dict(config)}
        for key in ("discount", "tau"):
            if not 0.0 <= float(c[key]) <= 1.0:
                raise ValueError(f"{key} must lie in [0, 1], got {c[key]!r}")
        d, h = int(c["hidden_dim"]), int(c["heads"])
        self.w2, self.discount, self.tau = float(c["w2"]), float(c["discount"]), float(c["tau"])
        self.model = Decoupler(dims, d, h, c["atten_dropout"])
        self.actor = Actor(d, h, c["ffn_dim"], c["dropout"], c["atten_dropout"], out_dim)
        self.critic = Critic(d, h, c["ffn_dim"], c["dropout"], c["atten_dropout"])
        if c["independent_target_init"]:  # official: two more networks with their own random weights
            self.actor_target = frozen_copy(ActionGates(d))
            self.critic_target = frozen_copy(Critic(d, h, c["ffn_dim"], c["dropout"], c["atten_dropout"]))
        else:
            self.actor_target = frozen_copy(ActionGates(d))
            self.actor_target.load_state_dict({k: v for k, v in self.actor.state_dict().items()
                                               if k.split(".")[0] in ("text_action", "audio_action", "vision_action")})
            self.critic_target = frozen_copy(self.critic)
        seed = c["replay_seed"] if c["replay_seed"] is not None else torch.initial_seed() % 2**63
        self.replay = ReplayRing(int(c["replay_capacity"]), c["replay_overflow"], int(seed))
        self._pending: Optional[dict[str, Tensor]] = None  # (state, action, reward) of the previous training step
        self._target_update_due = False

    # ---- inference ---------------------------------------------------------------------------------------------
    def infer(self, shared: Tensor, diff: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation path (official ``eval_epoch``): action = actor(diff) of the same batch, no buffer.
        shared, diff (B, 3L, d) → (prediction (B, out_dim), action (B, 3L, 1))."""
        action = self.actor.act(diff)
        return self.actor.predictor(shared, diff * action), action

    # ---- training ----------------------------------------------------------------------------------------------
    def objective(self, shared: Tensor, diff: Tensor, task_loss: Callable[[Tensor], Tensor],
                  reward: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """One training step's objective (see the module docstring).

        shared, diff (B, 3L, d) of the current batch (with gradients); ``task_loss(pred)`` → scalar (weighted);
        ``reward(pred_detached)`` → (B,). Returns ``loss`` (= task + critic + actor), ``task``, ``critic``,
        ``actor`` (zeros until the buffer holds more than B transitions), ``pred`` (B, out_dim), ``action``.
        """
        if self._target_update_due:
            self.soft_update_targets()
        b = diff.shape[0]
        pending = self._pending
        if pending is None:  # very first batch of the run: its own diff (official; not detached there either)
            state = diff
        else:
            diff_c = diff.detach()
            prev_action = pending["action"]
            n_prev = prev_action.shape[0]
            self.replay.push(pending["state"], prev_action, pending["reward"], _wrap_rows(diff_c, n_prev) * prev_action)
            state = diff_c * _wrap_rows(prev_action, b)
        action = self.actor.act(state)
        pred = self.actor.predictor(shared, diff * action)
        task = task_loss(pred)
        r = reward(pred.detach())
        self._pending = {"state": state.detach(), "action": action.detach(), "reward": r.detach()}
        zero = task.new_zeros(())
        critic_loss, actor_loss = zero, zero
        if len(self.replay) > b:
            critic_loss, actor_loss = self._rl_losses(b)
            self._target_update_due = True
        return {"loss": task + critic_loss + actor_loss, "task": task, "critic": critic_loss, "actor": actor_loss,
                "pred": pred, "action": action}

    def _rl_losses(self, n: int) -> tuple[Tensor, Tensor]:
        s, a, r, s2 = self.replay.sample(n)
        with torch.no_grad():
            target_q = r + self.discount * self.critic_target(s2, self.actor_target.act(s2))
        critic_loss = torch.nn.functional.l1_loss(self.critic(s, a), target_q) * self.w2
        # −Q(s, μ(s)) must move only the actor: the critic runs with detached parameters (its own buffers, so its
        # BatchNorm statistics update as in the official second critic call)
        frozen = {k: p.detach() for k, p in self.critic.named_parameters()}
        q = functional_call(self.critic, frozen, (s, self.actor.act(s)))
        return critic_loss, -q.mean() * self.w2

    @torch.no_grad()
    def soft_update_targets(self) -> None:
        """θ' ← (1 − τ)·θ' + τ·θ for the critic and the actor's gates (parameters only, official)."""
        pairs = [(self.critic_target.parameters(), self.critic.parameters()),
                 (self.actor_target.gate_parameters(), self.actor.gate_parameters())]
        targets = [t for tp, _ in pairs for t in tp]
        online = [p.detach() for _, op in pairs for p in op]
        torch._foreach_lerp_(targets, online, self.tau)
        self._target_update_due = False

    # ---- optimizers and checkpoints ----------------------------------------------------------------------------
    def param_groups(self, extra_model_params: Sequence[nn.Parameter] = ()) -> dict[str, list[dict]]:
        """Three optimizers as the official code: ``model`` (decoupler + ``extra_model_params``, e.g. BERT),
        ``actor`` (gates + predictor), ``critic``. Targets are never optimized."""
        return {"model": [{"params": list(extra_model_params) + list(self.model.parameters())}],
                "actor": [{"params": list(self.actor.parameters())}],
                "critic": [{"params": list(self.critic.parameters())}]}

    def rl_state(self) -> dict[str, Any]:
        """What a resumed run needs besides the state_dict: replay ring, carried transition, due target update."""
        pending = None if self._pending is None else {k: v.clone() for k, v in self._pending.items()}
        return {"replay": self.replay.state(), "pending": pending, "target_update_due": self._target_update_due}

    def load_rl_state(self, state: Mapping[str, Any]) -> None:
        device = next(self.parameters()).device
        self.replay.load_state(state["replay"], device=device)
        pending = state["pending"]
        self._pending = None if pending is None else {k: v.to(device) for k, v in pending.items()}
        self._target_update_due = bool(state["target_update_due"])

    def reset_rl_state(self) -> None:
        """Forget the buffer, the carried transition and a due target update (a fresh run with these weights)."""
        self.replay.clear()
        self._pending = None
        self._target_update_due = False
