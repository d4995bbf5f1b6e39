"""``msa-fast models``: list the registered models (with the datasets they have configurations for) and the datasets
(with their feature dimensions and sequence lengths).

The parser imports nothing heavy; the model registry (which imports torch through the model modules) is loaded only
when the command runs.
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("List the registered models with a one-line description and the datasets each has an official "
               "configuration for (the names msa-fast train -m / -d accept), then the datasets with their feature "
               "dimensions (text / audio / vision), unaligned sequence lengths, split sizes and label range.")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models and the datasets they support",
                       description=DESCRIPTION)
    p.set_defaults(func=main)


def describe_model(cls: type) -> str:
    """One line: the first paragraph of the model module's docstring, else the first line of the class docstring."""
    from .cli import first_paragraph

    module = sys.modules.get(cls.__module__)
    return (first_paragraph(getattr(module, "__doc__", None))
            or first_paragraph((cls.__doc__ or "").strip().split("\n")[0]) or cls.__name__)


def model_datasets(cls: type, all_datasets) -> list[str]:
    """Datasets with a configuration in ``cls.CONFIGS`` (keys other than "common"), in ``all_datasets`` order; a
    model without CONFIGS accepts every dataset."""
    configs = getattr(cls, "CONFIGS", None) or {}
    names = [k for k in configs if k != "common"]
    if not configs:
        return list(all_datasets)
    return [d for d in all_datasets if d in names] + sorted(n for n in names if n not in all_datasets)


def lines() -> list[str]:
    from .data.specs import DATASETS
    from .models.registry import available_models, get_model_class

    out = ["models (msa-fast train -m NAME):"]
    names = available_models()
    width = max((len(n) for n in names), default=0)
    for name in names:
        cls = get_model_class(name)
        out.append(f"  {name:<{width}}  {describe_model(cls)}")
        if getattr(cls, "provenance", ""):
            out.append(f"  {'':<{width}}  provenance: {cls.provenance}")
        out.append(f"  {'':<{width}}  datasets: {', '.join(model_datasets(cls, DATASETS)) or '(none)'}")
    out.append("")
    out.append("datasets (msa-fast train -d NAME; feature dim x unaligned length):")
    dw = max(len(n) for n in DATASETS)
    for name, spec in DATASETS.items():
        lo, hi = spec.label_range
        out.append(f"  {name:<{dw}}  text {spec.text_dim} x {spec.text_len}  audio {spec.audio_dim} x "
                   f"{spec.audio_len}  vision {spec.vision_dim} x {spec.vision_len}  splits "
                   f"{'/'.join(map(str, spec.splits))}  labels [{lo:g}, {hi:g}]  language {spec.language}")
    return out


def main(args: argparse.Namespace | None = None) -> int:
    print("\n".join(lines()))
    return 0
