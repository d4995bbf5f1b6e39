"""The data of a run: loading (pickle / synthetic, restricted unpickler), what a checkpoint records about it, the
pre-flight checks, and the predictions file."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..data.dataset import MMSADataset
from ..train_args import SYNTHETIC_SIZES


# ---- data & config helpers ----------------------------------------------------------------------------------
def load_data(data: str | os.PathLike | Mapping[str, Any], dataset_name: str = "mosi", seed: int = 0,
              aligned: bool = False, trusted: bool = False, return_report: bool = False,
              **synthetic_sizes: Optional[int]):
    """``data``: an MMSA pickle path, an already loaded ``{split: dict}``, or ``"synthetic"`` (small sizes by default:
    ``n_train``/``n_valid``/``n_test`` override ``SYNTHETIC_SIZES``; ``seed`` = the generator seed; ``aligned`` =
    the word-aligned ``aligned_50`` layout). Pickles are read with the restricted unpickler unless ``trusted``.
    ``return_report``: ``(data, report)`` with ``load_mmsa``'s validation report (e.g. non-finite values it zeroed)."""
    from ..data.mmsa import load_mmsa

    if not isinstance(data, Mapping) and str(data) == "synthetic":
        from ..data.synthetic import synthetic

        data = synthetic(dataset_name, seed=seed, aligned=aligned, **_synthetic_sizes(synthetic_sizes))
    elif not isinstance(data, Mapping) and not Path(data).is_file():
        raise FileNotFoundError(f"--data {str(data)!r} does not exist (give an MMSA pickle or 'synthetic')")
    # validated here (MMSADataset(..., validate=False) afterwards)
    return load_mmsa(data, trusted=trusted, return_report=return_report)


def _synthetic_sizes(given: Mapping[str, Optional[int]], defaults: Mapping[str, int] = SYNTHETIC_SIZES) -> dict:
    return {k: (given.get(k) if given.get(k) is not None else v) for k, v in defaults.items()}


def describe_data_source(data: Any, dataset_name: str, seed: int, aligned: bool,
                         sizes: Mapping[str, Optional[int]]) -> dict:
    """What a checkpoint records about its data so ``eval`` can re-read exactly it (or refuse): the synthetic
    generator's arguments, a pickle's absolute path and size, or ``in-memory`` (eval then needs ``--data``)."""
    if isinstance(data, Mapping):
        return {"kind": "in-memory"}
    if str(data) == "synthetic":
        return {"kind": "synthetic", "dataset": dataset_name, "seed": int(seed), "aligned": bool(aligned),
                **_synthetic_sizes(sizes)}
    path = Path(data).resolve()
    return {"kind": "file", "path": str(path), "size": path.stat().st_size}


def _data_from_source(source: Optional[Mapping[str, Any]], checkpoint: str | os.PathLike,
                      trusted: bool) -> dict:
    """Re-read the data a checkpoint was trained on, or say why it cannot be (pass ``--data`` then)."""
    if not source or source.get("kind") == "in-memory":
        raise ValueError(f"{checkpoint} does not record a data source it can re-read (trained on data passed in "
                         f"Python, or by an older msa-fast): pass --data FILE or --data synthetic")
    if source["kind"] == "synthetic":
        sizes = {k: source[k] for k in SYNTHETIC_SIZES}
        return load_data("synthetic", source["dataset"], seed=source["seed"], aligned=source["aligned"], **sizes)
    path = Path(source["path"])
    if not path.is_file():
        raise ValueError(f"{checkpoint} was trained on {path}, which no longer exists: pass --data FILE")
    if path.stat().st_size != source.get("size"):
        raise ValueError(f"{checkpoint} was trained on {path}, which has changed since ({source.get('size')} → "
                         f"{path.stat().st_size} bytes): pass --data FILE to evaluate on it anyway")
    return load_data(str(path), trusted=trusted)

def _needs_aligned(model_config: Mapping[str, Any]) -> bool:
    """Synthetic data in the word-aligned layout for models that read it (HME ``alignment="aligned"``, MMSA's
    ``need_data_aligned``)."""
    return model_config.get("alignment") == "aligned" or bool(model_config.get("need_data_aligned", False))


def _bert_vocab_size(model_config: Mapping[str, Any]) -> Optional[int]:
    """The BERT vocabulary the token ids must fit, when the model runs BERT from a config dict (a path's config is
    read by transformers at build time and checked by the embedding itself)."""
    bert = model_config.get("bert")
    if model_config.get("use_text_features") or not isinstance(bert, Mapping):
        return None
    return int(bert.get("vocab_size", 30522))


def check_data(data: Mapping[str, Any], model_name: str, model_config: Mapping[str, Any], dataset_name: str,
               allow_label_range: bool = False, source: str = "the data",
               load_report: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Everything about ``data`` that would fail or mislead a run, checked before the first epoch: ValueError with
    one line per problem; returns the warnings (e.g. labels out of range with ``allow_label_range``)."""
    from ..data.preflight import preflight_problems

    errors, warnings = preflight_problems(
        data, dataset_name, dims={m: int(model_config[f"{m}_dim"]) for m in ("audio", "vision")
                                  if f"{m}_dim" in model_config},
        vocab_size=_bert_vocab_size(model_config), allow_label_range=allow_label_range, load_report=load_report,
        required_keys=("text", "audio", "vision", "regression_labels") if model_config.get("use_text_features")
        else ("text_bert", "audio", "vision", "regression_labels"))
    if _needs_aligned(model_config):
        train = data["train"]
        # text_bert (N, 3, L_t) or text (N, L_t, 768)
        text_len = np.shape(train["text_bert"])[-1] if "text_bert" in train else np.shape(train["text"])[1]
        audio_len = np.asarray(train["audio"]).shape[1]
        if audio_len != text_len:
            errors.append(f"model {model_name!r} reads word-aligned features (MMSA aligned_50.pkl) but {source} is "
                          f"unaligned (audio {audio_len} frames vs text {text_len} tokens): use aligned_50.pkl or "
                          f"msa-fast data synth --aligned")
    if errors:
        raise ValueError(f"{len(errors)} problem(s) in {source}:\n  " + "\n  ".join(errors))
    return warnings


def write_predictions(path: str | os.PathLike, dataset: MMSADataset, predictions: torch.Tensor,
                      checkpoint: Optional[str] = None, append: bool = False) -> None:
    """CSV ``[checkpoint,] id, label, prediction`` in the split's order (MMSA's ``save_labels`` counterpart)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = dataset.labels.float().reshape(-1).tolist() if hasattr(dataset, "labels") else [None] * len(dataset)
    new = not (append and path.exists())
    with open(path, "a" if append else "w", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow((["checkpoint"] if checkpoint is not None else []) + ["id", "label", "prediction"])
        for sid, label, pred in zip(dataset.ids, labels, predictions.reshape(-1).tolist()):
            writer.writerow(([checkpoint] if checkpoint is not None else []) + [sid, label, f"{pred:.6f}"])


