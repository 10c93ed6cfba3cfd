"""Where linearard keeps what it derives once (converted models, dumped corpora)."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LINEARARD_CACHE``, else ``$XDG_CACHE_HOME/linearard``, else ``~/.cache/linearard``."""
    if os.environ.get("LINEARARD_CACHE"):
        return Path(os.environ["LINEARARD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "linearard"
