"""Where the official-code parity fixtures live: ``$MSA_FAST_PARITY_DIR`` or ``<repo>/../shared/parity``
(CI clones the repo with ``shared/`` beside it). Tests that need one skip with a clear reason when it is absent."""
import os
from pathlib import Path

PARITY_DIR = Path(os.environ.get("MSA_FAST_PARITY_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "parity"))


def parity_path(name: str) -> Path:
    """Path of fixture ``name`` (e.g. "hme_mosi.pt"); may not exist."""
    return PARITY_DIR / name



def load_parity(name: str) -> dict:
    """The fixture as saved by the official-code run (``weights_only`` load); skips the calling test if absent."""
    import pytest
    import torch

    path = parity_path(name)
    if not path.exists():
        pytest.skip(f"parity fixture {path} not found (set MSA_FAST_PARITY_DIR)")
    return torch.load(path, weights_only=True)
