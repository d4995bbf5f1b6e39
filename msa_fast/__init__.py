"""msa_fast: fused kernels and drop-in PyTorch models for Multimodal Sentiment Analysis.

Layers (each imports only the ones below it): ``cli`` → ``train`` → ``models`` → ``nn`` → ``ops``
(→ Triton ``kernels`` / C++ ``_C`` / ``testing.reference``), with ``retrieval``, ``data`` and ``metrics`` beside.
"""
from ._ext import cpp_available, triton_available

__version__ = "0.1.0"
__all__ = ["__version__", "cpp_available", "triton_available"]
