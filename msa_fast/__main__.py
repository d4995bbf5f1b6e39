"""``python -m msa_fast ...`` = the ``msa-fast`` command (see msa_fast.cli)."""
import sys

from .cli import main

sys.exit(main())
