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
    "diffusion, random order": "#e377c2",
    "probe": "#1f77b4",
    "argmax": "#ff7f0e",
    "control": "#7f7f7f",
    "random weights": "#9467bd",
    "majority": "#bcbd22",
}


# Further colours, for runs without one of their own (matplotlib's tab10, then tab20's light shades).
_SPARE_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#e377c2", "#ff7f0e", "#9467bd", "#8c564b", "#17becf",
                  "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")


def run_colours(names: Sequence[str]) -> dict[str, str]:
    """A distinct colour per run name: a condition's own colour (:data:`CONDITION_COLOURS`) where it
    has one not yet taken, otherwise the first spare colour no other run uses (cycling past 16)."""
    names = list(dict.fromkeys(names))
    colours: dict[str, str] = {}
    for name in names:
        own = CONDITION_COLOURS.get(name)
        if own is not None and own not in colours.values():
            colours[name] = own
    spare = [c for c in _SPARE_COLOURS if c not in colours.values() and c not in
             {CONDITION_COLOURS.get(n) for n in names}]
    for i, name in enumerate(n for n in names if n not in colours):
        colours[name] = spare[i % len(spare)] if spare else _SPARE_COLOURS[i % len(_SPARE_COLOURS)]
    return colours


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
