"""Where ggufloop keeps what it fetches and caches: one place, read from the environment, never from where
the package's source lies (an installed ggufloop has no checkout around it).

- the packaged models: ``GGUFLOOP_MODELS``, else ``$XDG_DATA_HOME/ggufloop/models``
  (``~/.local/share/ggufloop/models``), shared by every checkout and environment of a user;
- the cache (built wheels, the tests' architecture models, bench's duplicated files): ``GGUFLOOP_CACHE``,
  else ``$XDG_CACHE_HOME/ggufloop`` (``~/.cache/ggufloop``), as patches/build.py reads it;
- the stock llama-cpp-python's Python, for `bench`'s side-by-side runs: ``GGUFLOOP_STOCK_PYTHON``, else
  ``.venv-stock/bin/python`` in the current folder (what `make stock` makes).
"""

from __future__ import annotations

import os
from pathlib import Path


def _xdg(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value and Path(value).is_absolute() else Path.home() / default


def models_dir() -> Path:
    """The folder of the packaged models."""
    value = os.environ.get("GGUFLOOP_MODELS")
    return Path(value) if value else _xdg("XDG_DATA_HOME", ".local/share") / "ggufloop" / "models"


def cache_dir() -> Path:
    """ggufloop's cache folder."""
    value = os.environ.get("GGUFLOOP_CACHE")
    return Path(value) if value else _xdg("XDG_CACHE_HOME", ".cache") / "ggufloop"


def stock_python() -> Path:
    """The Python of the stock (unpatched) llama-cpp-python build."""
    return Path(os.environ.get("GGUFLOOP_STOCK_PYTHON", Path(".venv-stock") / "bin" / "python"))
