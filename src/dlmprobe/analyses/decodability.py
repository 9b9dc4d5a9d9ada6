"""Analysis 1: decodability over time — probe accuracy against denoising step and committed fraction.

For every stored (site, step), a linear probe reads a label position that is still masked at that
step and decodes the token the model will commit there (or the correct value). Plotted against the
step and against the fraction of the output already committed, per layer. Beside every probe, on
the same rows: the model's own read-out (the logit lens at that site and the model's argmax at the
position), input-only baselines on the same folds (position, prompt, embedding, the task's givens;
the strongest is the bar), a control task and random weights; per difficulty stratum too
(``tables["strata"]``), and the clock check (``tables["clock"]``): how well the same features
decode the step itself.

Example:
    >>> result = decodability(ActivationDataset("runs/sudoku.h5"), label="blank")
    >>> result.table[["layer", "step", "accuracy", "readout_accuracy", "baseline_selectivity"]].head()
    >>> result.figure.savefig("decodability.png")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dlmprobe.analyses.common import (
    best_site,
    default_label,
    describe_run,
    percent,
    points,
    strata_table,
    with_interval,
)
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure, layer_colours
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.probes import ProbeGrid, clock_table
from dlmprobe.probes.lens import ModelReaders
from dlmprobe.store import ActivationDataset

# Curves drawn beside the best layer's probe: column -> legend name.
BESIDE = {"readout_accuracy": "model's argmax", "lens_accuracy": "logit lens", "strongest_baseline_accuracy":
          "strongest input baseline", "control_accuracy": "control", "random_weights_accuracy": "random weights",
          "majority": "majority"}
COLOURS = {"model's argmax": CONDITION_COLOURS["argmax"], "logit lens": "#8c564b", "strongest input baseline": "#17becf"}


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
    readers: ModelReaders | None = None,
    clock: bool = True,
) -> AnalysisResult:
    """Probe accuracy per (site, step) before commit, beside the model's read-out and input baselines.

    Args:
        data: an activation store from ``dlmprobe cache`` (positions including the label's).
        label: the task label to decode (default: the task's answer label).
        target: ``"output"`` (what the model will commit) or ``"truth"`` (the correct value).
        sites, steps: subsets of the stored ones. The other arguments go to :class:`ProbeGrid`.
        grid: a configured grid to run instead of one made from the arguments above; it keeps its
            fitted state, so ``grid.out_of_fold(data)`` afterwards fits nothing again.
        readers: the model's read-out and embeddings (default: the built-in model the store names).
        clock: also decode the stored step from the same features (:func:`~dlmprobe.probes.clock_table`).
    """
    if grid is None:
        grid = ProbeGrid(label=default_label(data, label), target=target, read="own", phase="before_commit",
                         sites=sites, steps=steps, folds=folds, control=control, random_baseline=random_baseline,
                         bootstrap=bootstrap)
    label, target = grid.label, grid.target
    table = grid.run(data, progress=progress, readers=readers)
    tables = {}
    strata = strata_table(data, grid.rows_, n_boot=grid.bootstrap, seed=grid.seed)
    if len(strata):
        tables["strata"] = strata
    if clock and len(data.steps) >= 2:
        tables["clock"] = clock_table(data, label, sites=sorted(table["site"].unique()), folds=grid.folds, seed=grid.seed)
    return AnalysisResult(
        name="decodability", title=f"Decodability over time: {label} ({target}) before commit",
        table=table, figure=_plot(table, label), summary=_summary(table, tables, label, target, grid),
        tables=tables,
        meta={"run": describe_run(data), "grid": grid.settings(), "skipped_cells": grid.skipped_,
              "readers_left_out": grid.readers_note_},
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
            axis.plot(rows[x], rows["accuracy"], color=colours[layer], label=f"probe, layer {layer}")
        axis.fill_between(best[x], best["ci_low"], best["ci_high"], color=colours[best["layer"].iloc[0]], alpha=0.2)
        for column, name in BESIDE.items():
            if column in best:
                colour = COLOURS.get(name, CONDITION_COLOURS.get(name))
                axis.plot(best[x], best[column], ls="--", color=colour, label=f"{name} (best layer's rows)")
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
    curve.set_xlabel("denoising step")
    frac.set_xlabel("fraction of the output committed")
    curve.set_title("per layer, beside the model's read-out and controls")
    frac.set_title("against progress")
    frac.legend(fontsize=6, loc="lower right")
    return fig


def _summary(table: pd.DataFrame, tables: dict[str, pd.DataFrame], label: str, target: str, grid: ProbeGrid) -> str:
    site = best_site(table)
    rows = table[table["site"] == site].sort_values("step")
    first = rows.iloc[0]
    what = "the token the model will commit" if target == "output" else "the correct value"
    text = (
        f"At step {int(first['step'])} ({percent(first['committed_fraction'])} of the output committed), over "
        f"{int(first['n_rows'])} still-masked `{label}` positions of {int(first['n_examples'])} examples "
        f"({grid.folds}-fold by example, 95% intervals over examples), decoding {what}:\n\n"
        f"- a linear probe on layer {first['layer']} ({site}, the layer with the best mean accuracy): "
        f"{with_interval(first['accuracy'], first['ci_low'], first['ci_high'])};"
    )
    if "readout_accuracy" in first:
        text += (f"\n- the model's own argmax at the position at that step: "
                 f"{with_interval(first['readout_accuracy'], first['readout_ci_low'], first['readout_ci_high'])}; "
                 f"probe minus argmax {points(first['probe_over_readout'], first['probe_over_readout_ci_low'], first['probe_over_readout_ci_high'])};")
    if "lens_accuracy" in first:
        text += (f"\n- the logit lens on the probe's own features: "
                 f"{with_interval(first['lens_accuracy'], first['lens_ci_low'], first['lens_ci_high'])}; probe minus lens "
                 f"{points(first['probe_over_lens'], first['probe_over_lens_ci_low'], first['probe_over_lens_ci_high'])};")
    if "strongest_baseline" in first:
        text += (f"\n- the strongest input-only baseline on the same rows and folds (`{first['strongest_baseline']}`): "
                 f"{with_interval(first['strongest_baseline_accuracy'], first['strongest_baseline_ci_low'], first['strongest_baseline_ci_high'])}; "
                 f"probe minus it {points(first['baseline_selectivity'], first['baseline_selectivity_ci_low'], first['baseline_selectivity_ci_high'])}"
                 f" (the others: " + ", ".join(
                     f"{c[len('baseline_'):-len('_accuracy')]} {percent(first[c])}" for c in first.index
                     if c.startswith("baseline_") and c.endswith("_accuracy")
                     and c != f"baseline_{first['strongest_baseline']}_accuracy") + f", majority {percent(first['majority'])});")
    if "control_accuracy" in first:
        spread = "" if not np.isfinite(first["control_accuracy_sd"]) else f" ± {100 * first['control_accuracy_sd']:.0f}"
        text += (f"\n- control task (random labels per canvas position, mean{spread} points over "
                 f"{int(first['control_draws'])} draws): {percent(first['control_accuracy'])}, "
                 f"selectivity {100 * first['selectivity']:+.0f} points;")
    if "random_weights_accuracy" in first:
        text += f"\n- the same probe on a random-weights model: {percent(first['random_weights_accuracy'])}."
    text += _strata_sentence(tables.get("strata"), first)
    peak = rows.loc[rows["accuracy"].idxmax()]
    text += (f"\n\nOver the run the probe on {site} peaks at {percent(peak['accuracy'])} (step {int(peak['step'])}, "
             f"{percent(peak['committed_fraction'])} committed). ")
    by_layer = table.groupby("layer")["accuracy"].mean()
    text += "Mean probe accuracy over the steps by layer: " + ", ".join(
        f"layer {layer} {percent(acc)}" for layer, acc in by_layer.items()) + "."
    if "clock" in tables:
        clock = tables["clock"].set_index("site").loc[site]
        text += (f" Clock check: the same features at the same positions decode which of the "
                 f"{round(1 / clock['step_chance'])} stored steps it is with {percent(clock['step_accuracy'])} accuracy "
                 f"(chance {percent(clock['step_chance'])}) and the masked fraction with R² {clock['masked_fraction_r2']:.2f}, "
                 f"over {int(clock['n_rows'])} rows.")
    if grid.readers_note_:
        text += f" Left out: {grid.readers_note_}."
    return text


def _strata_sentence(strata: pd.DataFrame | None, first: pd.Series) -> str:
    """Probe, argmax and strongest baseline per difficulty stratum, at the headline cell."""
    if strata is None or not len(strata):
        return ""
    cell = strata[(strata["site"] == first["site"]) & (strata["step"] == first["step"]) & (strata["slot"] == first["slot"])]
    best = first.get("strongest_baseline")
    best = best if best == "majority" or not isinstance(best, str) else f"baseline_{best}"
    readers = [r for r in ("probe", "readout", best) if r in set(cell["reader"])]
    names = {"probe": "probe", "readout": "model's argmax", best: f"strongest baseline ({first.get('strongest_baseline')})"}
    parts = []
    for (_stratum, name), group in cell.groupby(["stratum", "stratum_name"], sort=True):
        by = group.set_index("reader")
        parts.append(f"{name} ({int(by['n_rows'].iloc[0])} positions of {int(by['n_examples'].iloc[0])} examples): " + ", ".join(
            f"{names.get(r, r)} {with_interval(by.loc[r, 'accuracy'], by.loc[r, 'ci_low'], by.loc[r, 'ci_high'])}"
            for r in readers))
    return "\n\nBy difficulty from the prompt alone, same step and layer: " + "; ".join(parts) + "."
