"""MMCL's replay buffer as a preallocated ring of device tensors.

The official ``ReplayBuffer`` (smwanghhh/Co-SA ``utils.py``, the same design MMCL imports) keeps a Python list of
per-row tuples, drops the oldest half when a push would reach the capacity (``count + n >= capacity``), samples
``n`` rows without replacement (``np.random.choice``) and copies them one by one to the GPU. Here: four tensors
allocated once (at the first push, from its shapes), a logical window ``[head, head + count)`` over them, one
``index_copy_`` per push and one ``index_select`` per sample, indices drawn with a seeded ``torch.Generator`` on the
buffer's device. Counts are Python ints (no host sync per step).

``overflow="drop_half"`` (official): the oldest half goes when a push would reach the capacity — dropping is
moving ``head``, O(1). ``"ring"``: a plain ring, the oldest rows are overwritten one for one.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

OVERFLOW_POLICIES = ("drop_half", "ring")
_FIELDS = ("states", "actions", "rewards", "next_states")


class ReplayRing(nn.Module):
    """Transitions (s (3L, d), a (3L, 1), r (), s' (3L, d)); the storage moves with ``.to(device)`` but is not in
    the ``state_dict`` (checkpoint it with ``state()`` / ``load_state()``: storage, head, count, generator)."""

    def __init__(self, capacity: int = 1000, overflow: str = "drop_half", seed: int = 0):
        super().__init__()
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"replay_overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
        if not isinstance(capacity, int) or capacity < 2:
            raise ValueError(f"replay_capacity must be an int >= 2, got {capacity!r}")
        self.capacity, self.overflow, self.seed = capacity, overflow, int(seed)
        for name in _FIELDS:
            self.register_buffer(name, None, persistent=False)
        self.head = 0  # physical row of the oldest transition
        self.count = 0
        self._generator: Optional[torch.Generator] = None

    def __len__(self) -> int:
        return self.count

    @property
    def allocated(self) -> bool:
        return self.states is not None

    def max_push(self) -> int:
        """Largest push the policy keeps within the storage (drop_half: the half kept + the push must fit)."""
        return self.capacity // 2 if self.overflow == "drop_half" else self.capacity

    # ---- writing ---------------------------------------------------------------------------------------------
    def push(self, states: Tensor, actions: Tensor, rewards: Tensor, next_states: Tensor) -> None:
        """Append n transitions: states / next_states (n, 3L, d), actions (n, 3L, 1), rewards (n,)."""
        n = states.shape[0]
        if n > self.max_push():
            raise ValueError(f"a push of {n} transitions exceeds what replay_capacity={self.capacity} holds with "
                             f"overflow={self.overflow!r} (at most {self.max_push()}): raise replay_capacity to at "
                             f"least {2 * n if self.overflow == 'drop_half' else n}")
        if not self.allocated:
            self._allocate(states, actions, rewards)
        elif states.shape[1:] != self.states.shape[1:]:
            raise ValueError(f"transition shape {tuple(states.shape[1:])} differs from the buffer's "
                             f"{tuple(self.states.shape[1:])} (the sequence length must not change during training)")
        if self.overflow == "drop_half":
            if self.count + n >= self.capacity:  # official: ``del buffer[:len(buffer) // 2]``
                self._drop_oldest(self.count // 2)
        elif self.count + n > self.capacity:
            self._drop_oldest(self.count + n - self.capacity)
        rows = (torch.arange(n, device=self.states.device) + (self.head + self.count)) % self.capacity
        for name, value in zip(_FIELDS, (states, actions, rewards, next_states)):
            getattr(self, name).index_copy_(0, rows, value.detach().to(getattr(self, name).dtype))
        self.count += n

    def _drop_oldest(self, k: int) -> None:
        self.head = (self.head + k) % self.capacity
        self.count -= k

    def _allocate(self, states: Tensor, actions: Tensor, rewards: Tensor) -> None:
        c, kw = self.capacity, dict(dtype=states.dtype, device=states.device)
        self.states = torch.zeros(c, *states.shape[1:], **kw)
        self.next_states = torch.zeros(c, *states.shape[1:], **kw)
        self.actions = torch.zeros(c, *actions.shape[1:], **kw)
        self.rewards = torch.zeros(c, *rewards.shape[1:], **kw)

    # ---- sampling --------------------------------------------------------------------------------------------
    @property
    def generator(self) -> torch.Generator:
        """The sampling generator, on the storage's device, seeded with ``seed`` when first used."""
        device = self.states.device if self.allocated else torch.device("cpu")
        if self._generator is None or self._generator.device.type != device.type:
            if self._generator is not None:
                raise RuntimeError("the replay buffer moved to another device after sampling began: its generator "
                                   "state cannot follow (move the model before training)")
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """n distinct stored transitions, uniformly (official ``np.random.choice(count, n, replace=False)``):
        (states, actions, rewards, next_states). Needs ``n <= len(self)``."""
        if not 0 < n <= self.count:
            raise ValueError(f"cannot sample {n} transitions from a buffer holding {self.count}")
        logical = torch.randperm(self.count, generator=self.generator, device=self.states.device)[:n]
        rows = (logical + self.head) % self.capacity
        return tuple(getattr(self, name).index_select(0, rows) for name in _FIELDS)  # type: ignore[return-value]

    # ---- checkpoint ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to continue exactly: storage (None before the first push), head, count and the
        generator state (None before the first sample)."""
        out: dict[str, Any] = {"capacity": self.capacity, "overflow": self.overflow, "seed": self.seed,
                               "head": self.head, "count": self.count,
                               "generator": None if self._generator is None else self._generator.get_state(),
                               "generator_device": None if self._generator is None else self._generator.device.type}
        for name in _FIELDS:
            t = getattr(self, name)
            out[name] = None if t is None else t.detach().clone()
        return out

    def load_state(self, state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        """Restore ``state()``; the storage goes to ``device`` (default: where it was saved)."""
        for key in ("capacity", "overflow"):
            if state[key] != getattr(self, key):
                raise ValueError(f"replay buffer {key} {state[key]!r} in the checkpoint differs from this model's "
                                 f"{getattr(self, key)!r}")
        for name in _FIELDS:
            t = state[name]
            setattr(self, name, None if t is None else t.to(device if device is not None else t.device).clone())
        self.seed, self.head, self.count = int(state["seed"]), int(state["head"]), int(state["count"])
        self._generator = None
        if state.get("generator") is not None:
            gen = self.generator
            if gen.device.type != state["generator_device"]:
                raise ValueError(f"the checkpoint's replay generator ran on {state['generator_device']}, this buffer "
                                 f"is on {gen.device.type}: resume on the same device kind")
            gen.set_state(state["generator"].cpu())

    def clear(self) -> None:
        self.head = self.count = 0
