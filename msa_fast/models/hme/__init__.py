"""hme: one method package (model, layers, benchmark factory); see model.py."""
from .model import HME

__all__ = ["HME"]
