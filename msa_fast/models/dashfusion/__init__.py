"""dashfusion: one method package (model, layers, benchmark factory); see model.py."""
from .model import DashFusion

__all__ = ["DashFusion"]
