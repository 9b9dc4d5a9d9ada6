"""Seed spread: the step-0 headline numbers of several training seeds of one model, side by side.

A finding about one trained network may be a fact about that draw of its initial weights. For
each run (one store per seed, all on the same puzzles), a probe grid at one site and one step
reports the probe, the model's own read-out (its argmax and the logit lens at that site), the
strongest input-only baseline on the same rows and folds, and the accuracy per difficulty stratum;
the summary gives the mean, the standard deviation and the range over seeds beside each seed's own
95% interval.

Example:
    >>> runs = {0: ActivationDataset("seed0.h5"), 1: ActivationDataset("seed1.h5"), 2: ActivationDataset("seed2.h5")}
    >>> result = seed_spread(runs, label="blank", target="truth", site="blocks.3.hook_resid_post", step=0)
    >>> result.tables["spread"]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from dlmprobe.analyses.common import default_label, describe_run, percent, strata_table
from dlmprobe.analyses.plotting import CONDITION_COLOURS, figure
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.probes import ProbeGrid
from dlmprobe.probes.stats import shared_fits
from dlmprobe.store import ActivationDataset

# Reader columns of a probe-grid row -> their name in this analysis.
READERS = {"accuracy": "probe", "readout_accuracy": "model's argmax", "lens_accuracy": "logit lens",
           "strongest_baseline_accuracy": "strongest input baseline"}
COLOURS = {"probe": CONDITION_COLOURS["probe"], "model's argmax": CONDITION_COLOURS["argmax"],
           "logit lens": "#8c564b", "strongest input baseline": "#17becf"}


def seed_spread(
    runs: Mapping[int, ActivationDataset],
    label: str | None = None,
    target: str = "output",
    site: str | None = None,
    step: int = 0,
    folds: int = 5,
    bootstrap: int = 200,
    progress: bool = False,
    note: str = "",
) -> AnalysisResult:
    """Probe, read-out, strongest input baseline and strata at (``site``, ``step``) for every seed.

    Args:
        runs: training seed -> that seed's store; all on the same task (and ideally the same
            examples, so that the seeds differ in the model only).
        label, target: what the probes decode (see :class:`~dlmprobe.probes.ProbeGrid`).
        site: the probed site (default: each store's deepest stored site).
        step: the stored step read (step 0: nothing committed yet).
        note: a sentence appended to the summary (e.g. how the stores were made).
    """
    if len(runs) < 2:
        raise DlmprobeInputError(f"a seed spread needs stores of at least 2 seeds, got {len(runs)}")
    stores = dict(sorted(runs.items()))
    first = next(iter(stores.values()))
    label = default_label(first, label)
    with shared_fits():  # the input-only baselines on the seeds' shared rows are fitted once
        fits = {seed: _one_seed(seed, data, first, label, target, site, step, folds, bootstrap, progress)
                for seed, data in stores.items()}
    table = pd.concat([rows for rows, _, _ in fits.values()], ignore_index=True)
    strata_parts = [strata for _, strata, _ in fits.values() if strata is not None]
    grids = {seed: settings for seed, (_, _, settings) in fits.items()}
    tables = {"spread": _spread(table, ["reader"])}
    if strata_parts:
        strata = pd.concat(strata_parts, ignore_index=True)
        tables["strata"] = strata
        tables["strata_spread"] = _spread(strata.rename(columns={"reader": "stratum_reader"}),
                                          ["stratum", "stratum_name", "stratum_reader"])
    return AnalysisResult(
        name="seeds", title=f"Seed spread at step {step}: {label} ({target}) before commit",
        table=table, figure=_plot(table, tables.get("strata")),
        summary=_summary(table, tables, label, target, step, folds) + (f"\n\n{note}" if note else ""),
        tables=tables, meta={"runs": {str(s): describe_run(d) for s, d in stores.items()}, "grid": grids},
    )


def _one_seed(seed: int, data: ActivationDataset, first: ActivationDataset, label: str, target: str, site: str | None,
              step: int, folds: int, bootstrap: int, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    """One seed's probe grid at (site, step): its readers' rows, its strata (None if the task has
    none) and the grid's settings."""
    if data.config.get("task") != first.config.get("task"):
        raise DlmprobeInputError(f"seed {seed}'s store {data.path} is of task {data.config.get('task')}, "
                                 f"expected the task of {first.path}: {first.config.get('task')}")
    where = site or data.sites[-1]
    if where not in data.sites:
        raise DlmprobeInputError(f"site {where!r} is not stored in {data.path}; it holds {data.sites}")
    if step not in set(data.steps.tolist()):
        raise DlmprobeInputError(f"step {step} is not stored in {data.path}; it holds steps {data.steps.tolist()}")
    grid = ProbeGrid(label=label, target=target, read="own", phase="before_commit", sites=[where], steps=[step],
                     folds=folds, control=False, random_baseline=False, bootstrap=bootstrap)
    table = grid.run(data, progress=progress)
    if not len(table):
        raise DlmprobeInputError(f"no {label!r} rows before commit at step {step} in {data.path}")
    row = table.iloc[0]
    strata = strata_table(data, grid.rows_, n_boot=bootstrap, seed=grid.seed)
    if len(strata):  # the probe, the model's argmax and this seed's strongest input baseline
        keep = {"probe", "readout", f"baseline_{row.get('strongest_baseline')}"}
        strata = strata[strata["reader"].isin(keep)].assign(seed=seed)
    return _seed_row(seed, data, row), strata if len(strata) else None, grid.settings()


def _seed_row(seed: int, data: ActivationDataset, row: pd.Series) -> pd.DataFrame:
    """One seed's readers as rows: reader, accuracy and its interval, on the same probe rows."""
    out = []
    for column, reader in READERS.items():
        if column not in row:
            continue
        prefix = "" if column == "accuracy" else column[: -len("accuracy")]
        out.append({"seed": seed, "model": (data.config.get("model") or {}).get("name"), "reader": reader,
                    "accuracy": row[column], "ci_low": row[f"{prefix}ci_low"], "ci_high": row[f"{prefix}ci_high"],
                    "site": row["site"], "step": int(row["step"]), "n_rows": int(row["n_rows"]),
                    "n_examples": int(row["n_examples"]),
                    "baseline": row.get("strongest_baseline") if reader == "strongest input baseline" else ""})
    return pd.DataFrame(out)


def _spread(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1), min and max of ``accuracy`` over seeds, per ``by`` group."""
    grouped = table.groupby(by, sort=False)["accuracy"]
    out = grouped.agg(mean="mean", sd="std", low="min", high="max", n_seeds="count").reset_index()
    return out


def _plot(table: pd.DataFrame, strata: pd.DataFrame | None):
    fig, axes = figure(ncols=2 if strata is not None else 1, width=5.2)
    seeds = sorted(table["seed"].unique())
    offsets = np.linspace(-0.25, 0.25, len(seeds))
    readers = [r for r in READERS.values() if r in set(table["reader"])]
    ax = axes[0]
    for i, reader in enumerate(readers):
        rows = table[table["reader"] == reader].set_index("seed").loc[seeds]
        ax.errorbar(i + offsets, rows["accuracy"], yerr=[rows["accuracy"] - rows["ci_low"], rows["ci_high"] - rows["accuracy"]],
                    fmt="o", color=COLOURS[reader], capsize=2, label=reader)
        ax.hlines(rows["accuracy"].mean(), i - 0.35, i + 0.35, color=COLOURS[reader], lw=2)
    ax.set_xticks(range(len(readers)), readers, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (dots: seeds, 95% CI; bar: mean)")
    ax.set_title(f"{len(seeds)} seeds: probe beside the model's read-out and the input bar")
    ax.grid(alpha=0.3, axis="y")
    if strata is not None:
        ax = axes[1]
        probe_rows = strata[strata["reader"] == "probe"]
        counts = probe_rows.groupby("stratum")["n_rows"].mean()
        names = [f"{name}\n{counts[stratum]:.0f} cells" for stratum, name in
                 probe_rows.drop_duplicates("stratum").sort_values("stratum")[["stratum", "stratum_name"]].itertuples(index=False)]
        for reader, colour, shift in (("probe", COLOURS["probe"], -0.15), ("baseline", COLOURS["strongest input baseline"], 0.15)):
            rows = strata[strata["reader"].eq("probe") if reader == "probe" else strata["reader"].str.startswith("baseline_")]
            for seed, off in zip(seeds, offsets / 3, strict=True):
                r = rows[rows["seed"] == seed].sort_values("stratum")
                ax.plot(np.arange(len(r)) + shift + off, r["accuracy"], "o", color=colour, alpha=0.8,
                        label=f"{reader}" if seed == seeds[0] else None)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_title("per difficulty stratum, every seed (cells per seed)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    return fig


def _summary(table: pd.DataFrame, tables: dict[str, pd.DataFrame], label: str, target: str, step: int, folds: int) -> str:
    seeds = sorted(table["seed"].unique())
    probe = table[table["reader"] == "probe"]
    what = "the token the model will commit" if target == "output" else "the correct value"
    text = (f"Over {len(seeds)} training seeds ({', '.join(str(s) for s in seeds)}) of `{probe['model'].iloc[0]}`, at step "
            f"{step} on {probe['site'].iloc[0]}, decoding {what} at still-masked `{label}` positions "
            f"({int(probe['n_rows'].iloc[0])} rows of {int(probe['n_examples'].iloc[0])} examples per seed, {folds}-fold by "
            f"example; mean ± sd over seeds, range, and each seed's 95% interval over examples):\n")
    spread = tables["spread"].set_index("reader")
    for reader in spread.index:
        rows = table[table["reader"] == reader].sort_values("seed")
        s = spread.loc[reader]
        name = reader
        if reader == "strongest input baseline":
            name += " (" + ", ".join(sorted(set(rows["baseline"].astype(str)))) + ")"
        text += (f"\n- {name}: {_mean_sd(s)} (range {percent(s['low'])}–{percent(s['high'])}; per seed "
                 + ", ".join(f"{percent(r.accuracy)} ({percent(r.ci_low)}–{percent(r.ci_high)})" for r in rows.itertuples())
                 + ");")
    by_seed = table.pivot_table(index="seed", columns="reader", values="accuracy")
    for other in ("model's argmax", "strongest input baseline"):
        if other in by_seed:
            diff = 100 * (by_seed["probe"] - by_seed[other])
            text += (f"\n- probe minus {other}: {diff.mean():+.1f} ± {diff.std(ddof=1):.1f} points over seeds "
                     f"(per seed {', '.join(f'{d:+.0f}' for d in diff)});")
    if "strata_spread" in tables:
        spread = tables["strata_spread"]
        counts = tables["strata"][tables["strata"]["reader"] == "probe"].groupby("stratum")["n_rows"].mean()
        parts = []
        # Strata in order of difficulty; negative codes (e.g. beyond naked singles) last.
        for (stratum, name), group in sorted(spread.groupby(["stratum", "stratum_name"]), key=lambda kv: (kv[0][0] < 0, kv[0][0])):
            g = group.set_index("stratum_reader")
            base = [r for r in g.index if r.startswith("baseline_")]
            part = f"{name} (~{counts.get(stratum, 0):.0f} positions per seed): probe {_mean_sd(g.loc['probe'])}"
            if "readout" in g.index:
                part += f", argmax {_mean_sd(g.loc['readout'])}"
            if base:
                part += f", {base[0][len('baseline_'):]} baseline {_mean_sd(g.loc[base[0]])}"
            parts.append(part)
        text += "\n\nBy difficulty from the prompt alone (mean ± sd over seeds): " + "; ".join(parts) + "."
    return text


def _mean_sd(row: pd.Series) -> str:
    sd = row["sd"]
    return f"{100 * row['mean']:.1f}%" + ("" if not np.isfinite(sd) else f" ± {100 * sd:.1f}")
