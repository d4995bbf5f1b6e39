"""Drop-in MSA models, registered by lowercase name: ``build("dashfusion", dataset="mosi", **overrides)``."""
from .base import MSAModel
from .registry import available_models, build, get_config, get_model_class, register

__all__ = ["MSAModel", "available_models", "build", "get_config", "get_model_class", "register"]
