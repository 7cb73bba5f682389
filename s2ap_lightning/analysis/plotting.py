"""Figures without pyplot: no global backend switch in library code, nothing left open in notebooks."""

from __future__ import annotations

from typing import Any


def subplots(*args: Any, figsize: tuple[float, float] | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Like ``plt.subplots`` but returns a standalone :class:`matplotlib.figure.Figure`."""
    from matplotlib.figure import Figure  # matplotlib loads slowly; only plots need it

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)
