"""matplotlib on the file-only backend, and figures written whole."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotrec.storage import replace_file


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display on servers and in Ray workers);
    imported on first use, since matplotlib is slow to import and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write a figure whole or not at all (`storage.replace_file`): never half a PNG."""
    plt = pyplot()

    def write(target: Path) -> None:
        with target.open("wb") as out:
            fig.savefig(out, dpi=120, format="png")

    replace_file(write, path)
    plt.close(fig)
    return path
