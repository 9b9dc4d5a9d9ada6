"""Analysis 3: diffusion vs autoregressive — the same probes on both, on a common axis.

A diffusion model can be read at the still-masked answer position itself (``read="own"``). An
autoregressive model has computed nothing there yet: "before commit" means reading the residual
stream at the last written position and decoding the answer token k positions ahead
(``read="frontier"``). Runs are compared against the fraction of the output committed and the
forward passes spent. The diffusion model decoded in forced left-to-right order (block length 1)
separates the effect of the decoding order from that of training: with the same weights it can be
read both ways.

Example:
    >>> runs = {"diffusion": ActivationDataset("d.h5"), "autoregressive": ActivationDataset("ar.h5"),
    ...         "diffusion, left-to-right": ActivationDataset("l2r.h5")}
    >>> result = compare_runs(runs, label="blank")
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.analyses.common import deepest_site, default_label, describe_run, kind_of, percent
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.store import ActivationDataset
from dlmprobe.probes import ProbeGrid
from dlmprobe.probes.stats import bootstrap_by_example


def reads_of(data: ActivationDataset) -> list[str]:
    """The reads a run supports: ``own`` for a diffusion model, ``frontier`` where ``<sep>`` is stored."""
    reads = ["own"] if kind_of(data) == "diffusion" else []
    if data.target_start - 1 in set(data.positions.tolist()):
        reads.append("frontier")
    return reads


def compare_runs(
    runs: Mapping[str, ActivationDataset],
    label: str | None = None,
    sites: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    folds: int = 5,
    bootstrap: int = 200,
    progress: bool = True,
) -> AnalysisResult:
    """Before-commit probe accuracy of every run and read, per layer and step, on common axes.

    Args:
        runs: name -> store; the names label the curves (e.g. ``"diffusion"``, ``"autoregressive"``,
            ``"diffusion, left-to-right"``). All must be of one task.
        label: the label decoded (default: the task's answer label).
        sites: sites probed (default: those every run stores); steps: a subset of the stored steps
            (each run must store them).
    """
    if not runs:
        raise DlmprobeInputError("compare_runs needs at least one run")
    tasks = {name: (d.config.get("task", {}).get("name"), str(d.config.get("task", {}).get("params"))) for name, d in runs.items()}
    if len(set(tasks.values())) > 1:
        raise DlmprobeInputError(f"runs must be of one task with the same options, got {tasks}")
    first = next(iter(runs.values()))
    label = default_label(first, label)
    common = [s for s in first.sites if all(s in d.sites for d in runs.values())]
    sites = list(sites) if sites is not None else common
    if not sites:
        raise DlmprobeInputError(f"the runs share no site: {[d.sites for d in runs.values()]}")
    tables, distance_tables = [], []
    for name, data in runs.items():
        reads = reads_of(data)
        if not reads:
            raise DlmprobeInputError(f"run {name!r} ({data.path.name}) is autoregressive but does not store the <sep> "
                                     f"position; record it with positions='sep+target'")
        for read in reads:
            # From the last written token one probe per distance ahead: one feature vector cannot
            # name the tokens of several positions at once.
            grid = ProbeGrid(label=label, read=read, sites=sites, steps=steps, folds=folds, control=False,
                             random_baseline=False, bootstrap=bootstrap, per_distance=read == "frontier")
            table = grid.run(data, progress=progress)
            if read == "frontier":
                table.insert(0, "run", name)
                distance_tables.append(table)
                table = _pool_distances(table, grid, bootstrap)
            else:
                table.insert(0, "run", name)
            table.insert(1, "kind", kind_of(data))
            table["forward_passes"] = table["step"] + 1
            table["solve_rate"] = float(np.mean(data.solved))
            tables.append(table)
    table = pd.concat(tables, ignore_index=True)
    by_distance = _by_distance(pd.concat(distance_tables, ignore_index=True)) if distance_tables else pd.DataFrame()
    return AnalysisResult(
        name="compare", title=f"Diffusion vs autoregressive: decoding `{label}` before it is written",
        table=table, figure=_plot(table, by_distance), summary=_summary(table, by_distance, label),
        tables={"by_distance": by_distance} if len(by_distance) else {},
        meta={"runs": {name: describe_run(d) for name, d in runs.items()}, "label": label, "sites": sites},
    )


def _pool_distances(table: pd.DataFrame, grid: ProbeGrid, bootstrap: int) -> pd.DataFrame:
    """Per-distance cells of a (site, step) pooled into one row: accuracy over all their rows, with a
    bootstrap interval over examples (rows of one example are not independent)."""
    records = []
    rng = np.random.default_rng(grid.seed)
    for (site, step), group in table.groupby(["site", "step"], sort=True):
        n = int(group["n_rows"].sum())
        parts = [grid.row_hits_[(site, int(step), int(d))] for d in group["distance"]]
        examples = np.concatenate([e for e, _ in parts])
        hit = np.concatenate([h for _, h in parts])
        hits = int(hit.sum())
        low, high = bootstrap_by_example(hit, examples, bootstrap, rng)
        first = group.iloc[0]
        records.append({
            "run": first["run"], "site": site, "layer": first["layer"], "step": int(step),
            "committed_fraction": first["committed_fraction"], "label": first["label"], "target": first["target"],
            "read": first["read"], "phase": first["phase"], "n_examples": int(group["n_examples"].max()),
            "n_rows": n, "accuracy": hits / n, "ci_low": low, "ci_high": high,
            "majority": float((group["majority"] * group["n_rows"]).sum() / n), "n_distances": len(group),
        })
    return pd.DataFrame(records)


def _by_distance(table: pd.DataFrame) -> pd.DataFrame:
    """Frontier-read accuracy by how many positions ahead of the last written token the answer lies."""
    table = table.assign(hits=table["accuracy"] * table["n_rows"], majority_hits=table["majority"] * table["n_rows"])
    out = table.groupby(["run", "site", "layer", "distance"], as_index=False)[["hits", "majority_hits", "n_rows"]].sum()
    out["accuracy"] = out["hits"] / out["n_rows"]
    out["majority"] = out["majority_hits"] / out["n_rows"]
    return out.drop(columns=["hits", "majority_hits"])


def _best_layer(table: pd.DataFrame) -> pd.DataFrame:
    """Per (run, read): the rows of the site with the best mean accuracy."""
    keep = []
    for _, group in table.groupby(["run", "read"], sort=False):
        site = group.groupby("site")["accuracy"].mean().idxmax()
        keep.append(group[group["site"] == site])
    return pd.concat(keep)


def _label(run: str, read: str) -> str:
    return f"{run} ({'reads own position' if read == 'own' else 'reads last written token'})"


def _plot(table: pd.DataFrame, by_distance: pd.DataFrame):
    fig, axes = figure(ncols=3 if len(by_distance) else 2, width=4.6)
    best = _best_layer(table)
    for (run, read), group in best.groupby(["run", "read"], sort=False):
        group = group.sort_values("step")
        colour = CONDITION_COLOURS.get(run)
        style = "-" if read == "own" else ":"
        name = f"{_label(run, read)}, layer {group['layer'].iloc[0]}"
        for axis, x in zip(axes[:2], ("committed_fraction", "forward_passes")):
            axis.plot(group[x], group["accuracy"], ls=style, color=colour, label=name)
            axis.fill_between(group[x], group["ci_low"], group["ci_high"], color=colour, alpha=0.15)
            axis.plot(group[x], group["majority"], ls="--", lw=0.8, color=colour, alpha=0.6)
    for axis, xlabel in zip(axes[:2], ("fraction of the output committed", "forward passes spent")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("probe accuracy, answer not yet written")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].set_title("best layer per run (dashed: majority)")
    axes[1].legend(fontsize=7, loc="lower right")
    if len(by_distance):
        axis = axes[2]
        for (run, site), group in by_distance.groupby(["run", "site"], sort=False):
            axis.plot(group["distance"], group["accuracy"], marker=".", label=f"{run}, {site.split('.hook')[0]}",
                      color=CONDITION_COLOURS.get(run), alpha=0.4 + 0.6 * (site == deepest_site(by_distance["site"])))
        axis.set_xlabel("positions ahead of the last written token")
        axis.set_ylabel("accuracy")
        axis.set_ylim(0, 1.02)
        axis.set_title("read-ahead by distance")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    return fig


def _summary(table: pd.DataFrame, by_distance: pd.DataFrame, label: str) -> str:
    parts = []
    for (run, read), group in _best_layer(table).groupby(["run", "read"], sort=False):
        first = group.sort_values("step").iloc[0]
        parts.append(
            f"{_label(run, read)}: {percent(group['accuracy'].mean())} mean accuracy over the run at layer "
            f"{first['layer']} (step {int(first['step'])}: {percent(first['accuracy'])}, majority "
            f"{percent(first['majority'])}); solves {percent(first['solve_rate'])}"
        )
    text = f"Decoding `{label}` tokens before they are written. " + "; ".join(parts) + "."
    if len(by_distance):
        last = by_distance[by_distance["site"] == deepest_site(by_distance["site"])]
        near = last[last["distance"] == 1]
        far = last[last["distance"] >= 5]
        for run in last["run"].unique():
            n1 = near[near["run"] == run]
            nf = far[far["run"] == run]
            if len(n1) and len(nf):
                far_accuracy = (nf["accuracy"] * nf["n_rows"]).sum() / nf["n_rows"].sum()
                far_majority = (nf["majority"] * nf["n_rows"]).sum() / nf["n_rows"].sum()
                text += (f" Reading ahead from the last written token ({run}, {last['site'].iloc[0]}): "
                         f"{percent(n1['accuracy'].iloc[0])} one position ahead, {percent(far_accuracy)} five or more "
                         f"ahead (majority {percent(far_majority)}).")
    return text
