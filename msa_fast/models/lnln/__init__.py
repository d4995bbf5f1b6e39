"""lnln: one method package (model, layers, benchmark factory); see model.py."""
from .model import LNLN

__all__ = ["LNLN"]
