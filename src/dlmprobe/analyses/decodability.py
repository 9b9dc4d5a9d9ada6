"""Analysis 1: decodability over time — probe accuracy against denoising step and committed fraction.

For every stored (site, step), a linear probe reads a label position that is still masked at that
step and decodes the token the model will commit there (or the correct value). Plotted against the
step and against the fraction of the output already committed, per layer, with the controls of the
probe grid (majority class, control task, random weights) so a plan can be told from a clock or a
lookup table.

Example:
    >>> result = decodability(ActivationDataset("runs/sudoku.h5"), label="blank")
    >>> result.table[["layer", "step", "accuracy", "control_accuracy"]].head()
    >>> result.figure.savefig("decodability.png")
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from dlmprobe.analyses.common import best_site, default_label, describe_run, percent
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure, layer_colours
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.probes import ProbeGrid
from dlmprobe.store import ActivationDataset


def decodability(
    data: ActivationDataset,
    label: str | None = None,
    target: str = "output",
    sites: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    folds: int = 5,
    control: bool = True,
    random_baseline: bool = True,
    bootstrap: int = 200,
    progress: bool = True,
    grid: ProbeGrid | None = None,
) -> AnalysisResult:
    """Probe accuracy per (site, step) before commit, as a layer x step heatmap and curves.

    Args:
        data: an activation store from ``dlmprobe cache`` (positions including the label's).
        label: the task label to decode (default: the task's answer label).
        target: ``"output"`` (what the model will commit) or ``"truth"`` (the correct value).
        sites, steps: subsets of the stored ones. The other arguments go to :class:`ProbeGrid`.
        grid: a configured grid to run instead of one made from the arguments above; it keeps its
            fitted state, so ``grid.out_of_fold(data)`` afterwards fits nothing again.
    """
    if grid is None:
        grid = ProbeGrid(label=default_label(data, label), target=target, read="own", phase="before_commit",
                         sites=sites, steps=steps, folds=folds, control=control, random_baseline=random_baseline,
                         bootstrap=bootstrap)
    label, target = grid.label, grid.target
    table = grid.run(data, progress=progress)
    fig = _plot(table, label)
    return AnalysisResult(
        name="decodability", title=f"Decodability over time: {label} ({target}) before commit",
        table=table, figure=fig, summary=_summary(table, label, target),
        meta={"run": describe_run(data), "grid": grid.settings(), "skipped_cells": grid.skipped_},
    )


def _plot(table: pd.DataFrame, label: str):
    fig, (heat, curve, frac) = figure(ncols=3, width=4.6)
    layers = sorted(table["layer"].unique())
    steps = sorted(table["step"].unique())
    grid = table.pivot_table(index="layer", columns="step", values="accuracy").reindex(index=layers, columns=steps)
    image = heat.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                        extent=(-0.5, len(steps) - 0.5, -0.5, len(layers) - 0.5))
    heat.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
    heat.set_xticks(ticks, [str(steps[i]) for i in ticks])
    heat.set_xlabel("denoising step")
    heat.set_ylabel("layer")
    heat.set_title(f"probe accuracy, {label} still masked")
    fig.colorbar(image, ax=heat, fraction=0.05)

    colours = layer_colours(layers)
    best = table[table["site"] == best_site(table)].sort_values("step")
    for axis, x in ((curve, "step"), (frac, "committed_fraction")):
        for layer in layers:
            rows = table[table["layer"] == layer].sort_values("step")
            axis.plot(rows[x], rows["accuracy"], color=colours[layer], label=f"layer {layer}")
        axis.fill_between(best[x], best["ci_low"], best["ci_high"], color=colours[best["layer"].iloc[0]], alpha=0.2)
        for column, name in (("control_accuracy", "control"), ("random_weights_accuracy", "random weights"),
                             ("majority", "majority")):
            if column in best:
                axis.plot(best[x], best[column], ls="--", color=CONDITION_COLOURS[name], label=f"{name} (best layer)")
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    curve.set_xlabel("denoising step")
    frac.set_xlabel("fraction of the output committed")
    curve.set_title("per layer, with controls")
    frac.set_title("against progress")
    frac.legend(fontsize=7, loc="lower right")
    return fig


def _summary(table: pd.DataFrame, label: str, target: str) -> str:
    site = best_site(table)
    rows = table[table["site"] == site].sort_values("step")
    first = rows.iloc[0]
    layer = first["layer"]
    what = "the token the model will commit" if target == "output" else "the correct value"
    text = (
        f"A linear probe on layer {layer} ({site}) decodes {what} at still-masked `{label}` positions with "
        f"{percent(first['accuracy'])} accuracy (95% CI {percent(first['ci_low'])}–{percent(first['ci_high'])}) "
        f"at step {int(first['step'])}, before {percent(first['committed_fraction'])} of the output is committed; "
        f"majority class {percent(first['majority'])}"
    )
    if "control_accuracy" in first:
        text += f", control task {percent(first['control_accuracy'])} (selectivity {100 * first['selectivity']:+.0f} points)"
    if "random_weights_accuracy" in first:
        text += f", random weights {percent(first['random_weights_accuracy'])}"
    text += ". "
    peak = rows.loc[rows["accuracy"].idxmax()]
    text += (f"Over the run it peaks at {percent(peak['accuracy'])} (step {int(peak['step'])}, "
             f"{percent(peak['committed_fraction'])} committed). ")
    by_layer = table.groupby("layer")["accuracy"].mean()
    text += "Mean accuracy over the steps by layer: " + ", ".join(
        f"layer {layer} {percent(acc)}" for layer, acc in by_layer.items()) + "."
    return text
