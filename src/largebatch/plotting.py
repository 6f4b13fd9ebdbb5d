"""Matplotlib set-up shared by every figure the package writes (headless Agg backend)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: it is slow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str, dpi: int = 120, tight: bool = True) -> str:
    """Lay out (unless ``tight=False``), write ``fig`` to ``path`` and free it; returns ``path``."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
