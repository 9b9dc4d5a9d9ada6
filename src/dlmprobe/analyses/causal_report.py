"""The figure and summary of :func:`dlmprobe.analyses.causal.causal_check`'s table."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from dlmprobe.analyses.common import percent
from dlmprobe.analyses.nulls import CONTROLS
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure

SUBSPACE_COLOURS = {"probe": CONDITION_COLOURS["probe"], "leace": "#8c564b", "random": CONDITION_COLOURS["control"],
                    "pca": "#17becf", "shuffled": "#bcbd22"}


def causal_figure(table: pd.DataFrame, meta: dict) -> Figure:
    fig, (ablate_ax, steer_ax, solve_ax) = figure(ncols=3, width=4.6)
    for (kind, name, matched), group in table.groupby(["intervention", "subspace", "matched_to"], sort=False):
        colour = SUBSPACE_COLOURS[name]
        style = {"": "-", "leace": "--", "probe": ":"}[matched]
        label = f"{kind} {name}" + (f" at {matched}'s displacement" if matched else "")
        steps = group["start_step"]
        ax, column = (ablate_ax, "changed") if kind == "ablate" else (steer_ax, "steered")
        ax.plot(steps, group[column], marker="o" if kind == "ablate" else "s", ls=style, color=colour, label=label)
        ax.fill_between(steps, group[f"{column}_low"], group[f"{column}_high"], color=colour, alpha=0.15)
        solve_ax.plot(steps, group["solved"], marker="o" if kind == "ablate" else "s", ls=style, color=colour, label=label)
    steer_ax.axhline(1 / len(meta["classes"]), color="black", ls=":", lw=1, label=f"chance 1/{len(meta['classes'])}")
    solve_ax.axhline(meta["clean_solved"], color="black", ls=":", lw=1, label="clean run")
    xlabel = "edits start at denoising step"
    ablate_ax.set(xlabel=xlabel, ylabel=f"edited {meta['label']!r} positions changed", ylim=(-0.02, 1.02),
                  title=f"ablate at {meta['site']} (dashed: controls at the effect's displacement)")
    steer_ax.set(xlabel=xlabel, ylabel="positions committing the chosen class", ylim=(-0.02, 1.02), title="steer")
    solve_ax.set(xlabel=xlabel, ylabel="exact-solve rate", ylim=(-0.02, 1.02), title="puzzles solved")
    for ax in (ablate_ax, steer_ax, solve_ax):
        ax.legend(fontsize=6)
    return fig


_NAMES = {"probe": "the probe's subspace", "leace": "the LEACE subspace", "random": "a random subspace",
          "pca": "the top principal directions left after erasure", "shuffled": "LEACE fitted on shuffled labels"}


def causal_summary(table: pd.DataFrame, meta: dict) -> str:
    rows = {(r.intervention, r.subspace, r.matched_to, r.start_step): r for r in table.itertuples()}
    first, last = meta["start_steps"][0], meta["start_steps"][-1]
    effects = meta["subspaces"]
    parts = [(f"The {meta['label']!r} probe at {meta['site']} reads the token the model will commit with "
              f"{percent(meta['probe_accuracy'])} held-out accuracy; the clean run solves {percent(meta['clean_solved'])}. "
              f"Edits from step {first} on act on {rows['ablate', effects[0], '', first].n_positions} still-masked "
              f"positions. Displacement is the mean norm of the edit per edited activation while sampling; every "
              f"control is scaled to the displacement of the effect it sits beside.")]
    for name in effects:
        row, steer = rows["ablate", name, "", first], rows["steer", name, "", first]
        controls = "; ".join(f"{_NAMES[c]} {percent(rows['ablate', c, name, first].changed)} (solving "
                             f"{percent(rows['ablate', c, name, first].solved)})" for c in CONTROLS)
        parts.append(
            f"Ablating {_NAMES[name]} moves activations by {row.displacement_run:.1f}, changes {percent(row.changed)} "
            f"({_ci(row, 'changed')}) of the edited tokens and leaves {percent(row.solved)} solved; at the same "
            f"displacement {controls}. The label-specific part, the excess over the strongest control, is "
            f"{100 * row.changed_beyond_control:+.0f} points of changed tokens (beyond {row.control}) and "
            f"{100 * row.solve_drop_beyond_control:+.0f} points of solve-rate drop; the rest of the effect a "
            f"label-blind edit of that size also has. A fresh probe trained on the ablated activations still "
            f"reads the token in {percent(row.retrained_after)} of held-out rows (the original probe: "
            f"{percent(row.probe_after)}). Steering in it (displacement {steer.displacement_run:.1f}) commits the "
            f"chosen class in {percent(steer.steered)} ({_ci(steer, 'steered')}; chance {percent(steer.chance)}).")
    if ("steer", "probe", "leace", first) in rows:
        steer = rows["steer", "probe", "leace", first]
        parts.append(f"Steering along the probe at LEACE's displacement ({steer.displacement_run:.1f}) commits the "
                     f"chosen class in {percent(steer.steered)} and changes {percent(steer.changed)}, against "
                     f"{percent(steer.control_changed)} for the strongest control of that size ({steer.control}).")
    if last != first:
        late = ", ".join(f"{percent(rows['ablate', name, '', last].changed)} ({name}; strongest matched control "
                         f"{percent(rows['ablate', name, '', last].control_changed)})" for name in effects)
        parts.append(f"From step {last} on ({rows['ablate', effects[0], '', last].n_positions} positions still masked) "
                     f"ablation changes {late}.")
    return " ".join(parts)


def _ci(row: object, column: str) -> str:
    return f"95% CI {percent(getattr(row, f'{column}_low'))}–{percent(getattr(row, f'{column}_high'))}"
