"""The released MMCL setting: IEMOCAP 4-emotion binary classification (RECONSTRUCTION of smwanghhh/MMCL).

Data (official ``data_loader.py``, the MulT ``iemocap_data.pkl``): splits ``train`` / ``valid`` / ``test``, keys
``text`` (N, 20, 300) GloVe, ``audio`` (N, 20, 74) COVAREP, ``vision`` (N, 20, 35) Facet, ``labels`` (N, 4, 2)
one-hot per emotion in the order neutral, happy, sad, angry (the code comment says otherwise; the metric loop
unpacks ``ne, ha, sa, an``); −inf → 0 in every modality. Head: Linear 128→8 viewed (B·4, 2), loss w1·CE; reward
per sample = Σ over the 4 emotions of softmax(logits)[true class]; metrics per emotion: accuracy and weighted F1
(argmax of the 2 logits).

Python API (no MMSA trainer: the data are not MMSA-shaped and there is no regression label):

    data = load_iemocap("iemocap_data.pkl")             # or load_iemocap(synthetic_iemocap(seed=0))
    result = train_iemocap(data, epochs=200, seed=1314)  # {"best_epoch", "history", "test": {...}}
    model = result["model"]; logits = model(text, audio, vision)   # (B, 8)

Bugs of the released loop and their flags (defaults fixed):
- ``misaligned_reward=True``: the official gather of the (4B, 2) probabilities with the (B, 4) label index (row i
  of the flattened matrix — sample ⌊i/4⌋, emotion i mod 4 — rewarded with sample i's four labels);
- ``independent_target_init=True``: targets initialised independently instead of copied;
- ``select_on="test_per_metric"``: the official per-metric test-set selection (best test value of every metric over
  epochs; leaky, reproduction only); default ``"valid_loss"`` selects one epoch on the validation loss and tests it;
- the undefined ``reward`` name (NameError on the first step) is simply fixed.
Training follows the official loop (train batches ``drop_last``, three Adam optimizers lr 3e-4, ReduceLROnPlateau
on the validation CE: model patience 30, actor / critic 5, factor 0.95), composed into one backward per step as the
MSA model (``agent.py``).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...metrics import weighted_f1
from .agent import NET_DEFAULTS, MMCLNet

EMOTIONS = ("neutral", "happy", "sad", "angry")
SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "audio", "vision")

#: Official train.py defaults (dims 300 / 74 / 35, L = 20).
IEMOCAP_CONFIG: dict[str, Any] = {**NET_DEFAULTS, "text_dim": 300, "audio_dim": 74, "vision_dim": 35,
                                  "misaligned_reward": False, "plateau_factor": 0.95, "plateau_model": 30,
                                  "plateau_actor": 5, "plateau_critic": 5}


# ---- data ------------------------------------------------------------------------------------------------------
def load_iemocap(source: str | Mapping[str, Any], trusted: bool = False) -> dict[str, dict[str, Tensor]]:
    """``iemocap_data.pkl`` (path, read with the restricted unpickler unless ``trusted``) or its loaded dict →
    ``{split: {"text", "audio", "vision": float32 (N, L, D) with −inf → 0, "labels": int64 (N, 4)}}``.

    Raises ValueError naming the split and key for a missing key, a non-3-D modality, sample counts that differ,
    modalities of different lengths (MMCL's decoupling needs one shared L) or labels not (N, 4, 2)."""
    if isinstance(source, Mapping):
        raw = source
    else:
        from ...data.safe_pickle import safe_load

        raw = safe_load(source, trusted=trusted)
    out: dict[str, dict[str, Tensor]] = {}
    for split in SPLITS:
        if split not in raw:
            raise ValueError(f"IEMOCAP data has no {split!r} split (has {sorted(raw)})")
        d = raw[split]
        missing = [k for k in (*MODALITIES, "labels") if k not in d]
        if missing:
            raise ValueError(f"IEMOCAP split {split!r} lacks keys {missing}")
        tensors = {}
        for m in MODALITIES:
            x = np.asarray(d[m], dtype=np.float32).copy()
            if x.ndim != 3:
                raise ValueError(f"IEMOCAP {split}.{m} must be (N, L, D), got shape {x.shape}")
            x[np.isneginf(x)] = 0.0  # official: −inf → 0
            tensors[m] = torch.from_numpy(x)
        labels = np.asarray(d["labels"])
        if labels.ndim != 3 or labels.shape[1:] != (4, 2):
            raise ValueError(f"IEMOCAP {split}.labels must be (N, 4, 2) one-hot, got shape {labels.shape}")
        tensors["labels"] = torch.from_numpy(labels.argmax(-1).astype(np.int64))
        sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
        lengths = {m: int(tensors[m].shape[1]) for m in MODALITIES}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"IEMOCAP split {split!r}: sample counts differ {sizes}")
        if len(set(lengths.values())) != 1:
            raise ValueError(f"IEMOCAP split {split!r}: MMCL's decoupling needs one shared sequence length, got "
                             f"{lengths}")
        out[split] = tensors
    return out


def synthetic_iemocap(n_train: int = 64, n_valid: int = 32, n_test: int = 32, seq_len: int = 20,
                      dims: tuple[int, int, int] = (300, 74, 35), seed: int = 0,
                      neg_inf_rate: float = 0.01) -> dict[str, dict[str, np.ndarray]]:
    """A dict in the ``iemocap_data.pkl`` layout with a planted signal (what ``pickle.load`` gives).

    Per sample, four latents z_e ~ N(0, 1); emotion e is present (label one-hot [0, 1]) when z_e > 0.8 (≈ 21 %, the
    minority class as in IEMOCAP). Every modality's tokens are N(0, 1) noise + 0.8·Σ_e z_e·u_{m,e} with fixed random
    directions u (entries N(0, 0.25)), so each modality alone carries every emotion; a fraction ``neg_inf_rate``
    of audio entries is −inf (COVAREP files have them; the loader zeroes them)."""
    rng = np.random.default_rng(seed)
    dirs = [0.5 * rng.standard_normal((4, d)).astype(np.float32) for d in dims]
    out = {}
    for split, n in zip(SPLITS, (n_train, n_valid, n_test)):
        z = rng.standard_normal((n, 4)).astype(np.float32)
        split_data = {}
        for m, d, u in zip(MODALITIES, dims, dirs):
            x = rng.standard_normal((n, seq_len, d)).astype(np.float32) + 0.8 * (z @ u)[:, None, :]
            split_data[m] = x
        mask = rng.random(split_data["audio"].shape) < neg_inf_rate
        split_data["audio"][mask] = -np.inf
        present = (z > 0.8).astype(np.int64)
        split_data["labels"] = np.eye(2, dtype=np.float32)[present]  # (N, 4, 2)
        out[split] = split_data
    return out


# ---- objective and metrics -------------------------------------------------------------------------------------
def emotion_reward(logits: Tensor, labels: Tensor, misaligned: bool = False) -> Tensor:
    """Joint reward per sample: logits (B, 8), labels (B, 4) int → (B,) = Σ_e softmax(logits_e)[y_e].

    ``misaligned=True`` reproduces the official gather: the (4B, 2) probability matrix gathered with the (B, 4)
    label index, so sample i gets Σ_e p[row i, y_{i,e}] where row i belongs to sample ⌊i/4⌋, emotion i mod 4."""
    probs = torch.softmax(logits.reshape(-1, 2), dim=-1)  # (4B, 2)
    if misaligned:
        return torch.gather(probs, 1, labels.reshape(-1, 4)).sum(1)
    return probs.reshape(-1, 4, 2).gather(2, labels.unsqueeze(-1)).sum((1, 2))


def iemocap_metrics(logits: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> dict[str, float]:
    """Per-emotion accuracy and weighted F1 (official ``test_score_model``): logits (N, 8) or (N, 4, 2), labels
    (N, 4) int → ``{"acc_neutral", ..., "f1_angry", "acc_mean", "f1_mean", "Loss" (mean CE)}``."""
    lg = torch.as_tensor(logits).float().reshape(-1, 4, 2)
    y = torch.as_tensor(labels).long().reshape(-1, 4)
    pred = lg.argmax(-1).numpy()
    truth = y.numpy()
    out: dict[str, float] = {}
    for e, name in enumerate(EMOTIONS):
        out[f"acc_{name}"] = float(np.mean(pred[:, e] == truth[:, e]))
        out[f"f1_{name}"] = float(weighted_f1(truth[:, e], pred[:, e]))
    out["acc_mean"] = float(np.mean([out[f"acc_{n}"] for n in EMOTIONS]))
    out["f1_mean"] = float(np.mean([out[f"f1_{n}"] for n in EMOTIONS]))
    out["Loss"] = float(F.cross_entropy(lg.reshape(-1, 2), y.reshape(-1)))
    return out


# ---- model -----------------------------------------------------------------------------------------------------
class MMCLIemocap(nn.Module):
    """The released MMCL on IEMOCAP: ``forward(text, audio, vision)`` (B, L, D_*) → logits (B, 8) (evaluation
    path); ``training_step(text, audio, vision, labels)`` → ``loss`` (= w1·CE + critic + actor), ``task``,
    ``critic``, ``actor``, ``logits``. ``config``: overrides of ``IEMOCAP_CONFIG``."""

    def __init__(self, **config: Any):
        super().__init__()
        unknown = sorted(set(config) - set(IEMOCAP_CONFIG))
        if unknown:
            raise ValueError(f"unknown MMCL IEMOCAP config keys {unknown}; known: {sorted(IEMOCAP_CONFIG)}")
        self.config = {**IEMOCAP_CONFIG, **config}
        c = self.config
        self.net = MMCLNet((c["text_dim"], c["audio_dim"], c["vision_dim"]), 8, c)

    def forward(self, text: Tensor, audio: Tensor, vision: Tensor) -> Tensor:
        shared, diff = self.net.model(text, audio, vision)
        return self.net.infer(shared, diff)[0]

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """w1 · CE over the (4B, 2) view."""
        return F.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1)) * float(self.config["w1"])

    def training_step(self, text: Tensor, audio: Tensor, vision: Tensor, labels: Tensor) -> dict[str, Tensor]:
        shared, diff = self.net.model(text, audio, vision)
        misaligned = bool(self.config["misaligned_reward"])
        out = self.net.objective(shared, diff, lambda lg: self.task_loss(lg, labels),
                                 lambda lg: emotion_reward(lg, labels, misaligned))
        return {"loss": out["loss"], "task": out["task"].detach(), "critic": out["critic"].detach(),
                "actor": out["actor"].detach(), "logits": out["pred"].detach()}

    def optimizers(self, lr: float = 3e-4) -> tuple[dict[str, torch.optim.Optimizer], dict[str, Any]]:
        """Three Adam optimizers (model, actor, critic) and their ReduceLROnPlateau schedulers (official)."""
        c = self.config
        opts = {name: torch.optim.Adam(groups[0]["params"], lr=lr)
                for name, groups in self.net.param_groups().items()}
        plateaus = {name: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=c["plateau_factor"],
                                                                     patience=int(c[f"plateau_{name}"]))
                    for name, opt in opts.items()}
        return opts, plateaus

    def load_official_state_dict(self, saved: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Load an official checkpoint ``{"model": Model.state_dict(), "actor": Actor.state_dict()}`` (what
        ``train.py`` saves; the official sequence-first encoders have the same keys). The critic is not saved
        officially and keeps its weights; the targets are set to copies of the loaded online networks."""
        self.net.model.load_state_dict(dict(saved["model"]), strict=True)
        self.net.actor.load_state_dict(dict(saved["actor"]), strict=True)
        self.net.actor_target.load_state_dict(
            {k: v for k, v in self.net.actor.state_dict().items() if k.split(".")[0].endswith("_action")})
        self.net.critic_target.load_state_dict(self.net.critic.state_dict())


# ---- training entry point --------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_iemocap(model: MMCLIemocap, split: Mapping[str, Tensor], batch_size: int = 256,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """``iemocap_metrics`` of ``model`` on one split (in order; the official loader shuffles, which only changes
    the order)."""
    was = model.training
    model.eval()
    logits = []
    try:
        for start in range(0, split["labels"].shape[0], batch_size):
            rows = slice(start, start + batch_size)
            logits.append(model(*(split[m][rows].to(device) for m in MODALITIES)).float().cpu())
    finally:
        model.train(was)
    return iemocap_metrics(torch.cat(logits), split["labels"])


def train_iemocap(data: Mapping[str, Mapping[str, Tensor]], epochs: int = 200, batch_size: int = 128,
                  eval_batch_size: int = 256, lr: float = 3e-4, seed: int = 1314, device: torch.device | str = "cpu",
                  select_on: str = "valid_loss", log: Optional[Callable[[str], None]] = None,
                  **config: Any) -> dict[str, Any]:
    """Train the released MMCL on ``load_iemocap`` data (official loop, one backward per step, see the module
    docstring). ``select_on="valid_loss"``: the epoch with the lowest validation CE is restored and tested once;
    ``"test_per_metric"``: the official leaky protocol (best test value per metric over epochs).

    Returns ``{"model", "best_epoch", "history": [{"epoch", "train_loss", "valid_loss", "lr"}], "test": metrics}``.
    """
    if select_on not in ("valid_loss", "test_per_metric"):
        raise ValueError(f"select_on must be 'valid_loss' or 'test_per_metric', got {select_on!r}")
    train = data["train"]
    n = int(train["labels"].shape[0])
    if n < batch_size:
        raise ValueError(f"the train split has {n} samples, fewer than one batch of {batch_size} (batches drop_last)")
    torch.manual_seed(seed)
    model = MMCLIemocap(**config).to(device)
    opts, plateaus = model.optimizers(lr)
    order_gen = torch.Generator().manual_seed(seed)
    history, best, best_state, test_best = [], math.inf, None, {}
    best_epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=order_gen)
        losses = []
        for start in range(0, n - batch_size + 1, batch_size):  # official: drop_last=True
            rows = perm[start:start + batch_size]
            out = model.training_step(*(train[m][rows].to(device) for m in MODALITIES),
                                      train["labels"][rows].to(device))
            for opt in opts.values():
                opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            for opt in opts.values():
                opt.step()
            losses.append(out["task"])
        valid = evaluate_iemocap(model, data["valid"], eval_batch_size, device)
        for sched in plateaus.values():
            sched.step(valid["Loss"])
        record = {"epoch": epoch, "train_loss": float(torch.stack(losses).mean()), "valid_loss": valid["Loss"],
                  "lr": opts["model"].param_groups[0]["lr"]}
        if select_on == "test_per_metric":
            test = evaluate_iemocap(model, data["test"], eval_batch_size, device)
            for k, v in test.items():
                better = v < test_best.get(k, math.inf) if k == "Loss" else v >= test_best.get(k, -math.inf)
                if better:
                    test_best[k] = v
        elif valid["Loss"] < best:
            best, best_epoch = valid["Loss"], epoch
            best_state = copy.deepcopy(model.state_dict())
        history.append(record)
        if log is not None:
            log(f"epoch {epoch}: train {record['train_loss']:.4f} valid CE {valid['Loss']:.4f} "
                f"acc {valid['acc_mean']:.4f} f1 {valid['f1_mean']:.4f}")
    if select_on == "test_per_metric":
        return {"model": model, "best_epoch": None, "history": history, "test": test_best}
    model.load_state_dict(best_state)
    return {"model": model, "best_epoch": best_epoch, "history": history,
            "test": evaluate_iemocap(model, data["test"], eval_batch_size, device)}
