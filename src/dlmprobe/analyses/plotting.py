"""Shared figure conventions: pyplot-free figures, one colour per layer, one per condition."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

# Conditions compared across analyses keep their colour everywhere.
CONDITION_COLOURS = {
    "diffusion": "#1f77b4",
    "autoregressive": "#d62728",
    "diffusion, left-to-right": "#2ca02c",
    "probe": "#1f77b4",
    "argmax": "#ff7f0e",
    "control": "#7f7f7f",
    "random weights": "#9467bd",
    "majority": "#bcbd22",
}


def figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6,
           **kwargs) -> tuple[Figure, Sequence]:
    """A figure with a grid of axes (always returned as a flat list), without touching pyplot."""
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, [ax for row in axes for ax in row]


def layer_colours(layers: Sequence[int]) -> dict[int, tuple]:
    """A sequential colour per layer (dark = early, bright = late)."""
    cmap = matplotlib.colormaps["viridis"]
    layers = sorted(set(layers))
    n = max(len(layers) - 1, 1)
    return {layer: cmap(0.1 + 0.8 * i / n) for i, layer in enumerate(layers)}
