"""Where the official-code parity fixtures live: ``$MSA_FAST_PARITY_DIR`` or ``<repo>/../shared/parity``
(CI clones the repo with ``shared/`` beside it). Tests that need one skip with a clear reason when it is absent."""
import os
from pathlib import Path

PARITY_DIR = Path(os.environ.get("MSA_FAST_PARITY_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "parity"))


def parity_path(name: str) -> Path:
    """Path of fixture ``name`` (e.g. "hme_mosi.pt"); may not exist."""
    return PARITY_DIR / name

