"""midg: one method package (model, layers, invariance objectives, benchmark factory); see model.py.
Reconstruction, not the authors' code."""
from .model import MIDG

__all__ = ["MIDG"]
