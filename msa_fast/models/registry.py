"""Models registered by lowercase name (as MMSA's ``AMIO.MODEL_MAP``), configs layered
dataset → model common → model×dataset → user overrides.

A model module does::

    @register("dashfusion")
    class DashFusion(MSAModel):
        CONFIGS = {"common": {...}, "mosi": {...}, "mosei": {...}}
        def __init__(self, config: dict): ...

and users call ``msa_fast.models.build("dashfusion", dataset="mosi", d_model=64)``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from ..data.specs import get_dataset_spec

MODEL_MAP: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    key = name.lower()

    def deco(cls: type) -> type:
        if key in MODEL_MAP and MODEL_MAP[key] is not cls:
            raise ValueError(f"model name {key!r} is already registered to {MODEL_MAP[key].__name__}")
        MODEL_MAP[key] = cls
        cls.model_name = key
        return cls

    return deco


def get_config(name: str, dataset: str = "mosi", **overrides: Any) -> dict[str, Any]:
    """The merged configuration dict of model ``name`` on ``dataset`` with ``overrides`` applied last."""
    cls = get_model_class(name)
    spec = get_dataset_spec(dataset)
    configs = getattr(cls, "CONFIGS", {})
    ds_key = spec.name
    if configs and ds_key not in configs:
        supported = sorted(k for k in configs if k != "common")
        raise ValueError(f"model {name!r} has no configuration for dataset {dataset!r}; supported: {supported}")
    config: dict[str, Any] = {
        "dataset": spec.name,
        "text_len": spec.text_len,
        "audio_len": spec.audio_len,
        "vision_len": spec.vision_len,
        "text_dim": spec.text_dim,
        "audio_dim": spec.audio_dim,
        "vision_dim": spec.vision_dim,
    }
    config.update(copy.deepcopy(configs.get("common", {})))
    config.update(copy.deepcopy(configs.get(ds_key, {})))
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"unknown config keys for model {name!r}: {unknown}; known keys: {sorted(config)}")
    for key, value in overrides.items():
        check_value_type(key, value, config[key], f"model {name!r} config key {key}")
    config.update(overrides)
    return config


def check_value_type(key: str, value: Any, default: Any, what: str) -> None:
    """TypeError naming ``what`` when ``value`` cannot stand where a number / flag / list default stands (a
    ``--set d_model=abc`` must fail here, not deep inside the model). ``None`` and str / dict defaults (paths or
    configs, e.g. ``bert``) are not checked; an int is accepted where a float is expected."""
    if value is None or default is None:
        return
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, (list, tuple)):
        ok, expected = isinstance(value, (list, tuple)), "a JSON list"
    else:
        return
    if not ok:
        raise TypeError(f"{what} must be {expected} (default {default!r}), got {value!r}")


def get_model_class(name: str) -> type:
    _import_all()
    key = name.lower()
    if key not in MODEL_MAP:
        raise ValueError(f"model must be one of {sorted(MODEL_MAP)}, got {name!r}")
    return MODEL_MAP[key]


def build(name: str, dataset: str = "mosi", **overrides: Any):
    """Build model ``name`` with the official defaults for ``dataset``; ``overrides`` replace config values."""
    cls = get_model_class(name)
    return cls(get_config(name, dataset, **overrides))


def available_models(library_only: bool = False) -> list[str]:
    """Registered model names; ``library_only``: only the models of the method packages (not ones a user or a test
    registered elsewhere)."""
    _import_all()
    return sorted(k for k, cls in MODEL_MAP.items() if not library_only or cls.__module__.startswith(__package__ + "."))


def method_packages() -> list[str]:
    """Names of the method packages ``msa_fast/models/<method>/`` (a folder scan: nothing lists them by hand)."""
    import pkgutil
    from pathlib import Path

    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.ispkg)


def _import_all() -> None:
    """Import every method package: their ``@register`` decorators fill ``MODEL_MAP``."""
    import importlib

    for name in method_packages():
        importlib.import_module(f"msa_fast.models.{name}")
