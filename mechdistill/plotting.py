"""Saving figures: matplotlib's object API (`Figure`, rendered by Agg), so no global pyplot state is
touched, written atomically and without timestamps (same data -> same bytes).

Each phase package draws its own figures from artifacts (`anchors.plots`, `characterize.plots`,
`patching.plots`, `evaluate.plots`) and saves them with `save_figure`.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from .io import atomic_path


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Write `fig` atomically; the format comes from the file suffix; no timestamp metadata."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    metadata = {"Software": None} if fmt == "png" else {"CreationDate": None} if fmt == "pdf" else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
