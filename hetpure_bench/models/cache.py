"""Where downloaded and converted artifacts live: ``$HETPURE_HOME`` or ``~/.cache/hetpure_bench``."""

from __future__ import annotations

import os
from pathlib import Path


def hetpure_home() -> Path:
    """The cache root (not created here: writers create the sub-folder they need)."""
    env = os.environ.get("HETPURE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hetpure_bench"
