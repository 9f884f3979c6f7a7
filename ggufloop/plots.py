"""Figures without a display: one place for matplotlib's set-up and saving."""

from __future__ import annotations

import warnings
from pathlib import Path


def subplots(*args, **kwargs):
    """matplotlib's subplots on the file-only Agg backend (imported on first use: it is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save(fig, path: "str | Path", dpi: int = 110) -> None:
    """Lay out, write and release a figure."""
    import matplotlib.pyplot as plt

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # tokens in scripts the font lacks
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
