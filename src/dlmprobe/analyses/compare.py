"""Analysis 3: diffusion vs autoregressive — the same probes on every run, like for like first.

An autoregressive model has computed nothing at a position it has not reached: "before commit" it
can only be read at the last written token, decoding the token k positions ahead
(``read="frontier"``). So every run is compared **like for like** there: read at the last token of
its written prefix (the ``<sep>`` token before anything is written; a store needs the ``<sep>``
position, ``positions="sep+target"``), at the same distances ahead, with both label definitions
(``output``: the token the run commits; ``truth``: the correct value), and every (step, distance)
cell trained on as many rows as the smallest run has there (a random subset of the others). Beside
each run, on its rows: the model's own argmax at the probed position, the logit lens at the read
position, and the input-only baselines.

**Text runs** (Hugging Face models on one text task, ``--positions answer-slot``): every run is
read at the token before its answer slot (the last token of the template's fixed text, e.g. "The
answer is"), one probe per distance into the slot. A causal LM is read there at the step at which
it writes the slot's first token: that token is then its last written one, as in Future Lens. A
diffusion LM is read at the same position at every stored step (the slot still masked), and each
(step, distance) cell is capped at the fewest rows any other run has at that distance. Beside each
probe: the run's own argmax and its logit lens. The table ``runs`` gives every model's task
accuracy and whether the models share an initialisation (``shared_init``: Dream-7B was initialised
from Qwen2.5-7B, so a difference between them is what diffusion training changed).

A diffusion model can also be read at the still-masked position itself (``read="own"``), reported
apart: that reads a different position than the twin, so it compares models and read positions at
once. The diffusion model decoded in forced left-to-right order (block length 1), or in random
order, separates the decoding order from training: the same weights under another sampler.

Example:
    >>> runs = {"diffusion": ActivationDataset("d.h5"), "autoregressive": ActivationDataset("ar.h5"),
    ...         "diffusion, left-to-right": ActivationDataset("l2r.h5")}
    >>> result = compare_runs(runs, label="blank")
    >>> result.tables["by_distance"]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from dlmprobe.analyses.common import (
    check_slot_read_on_canvas,
    deepest_site,
    default_label,
    describe_run,
    is_text_run,
    kind_of,
    percent,
    task_key,
    wilson_rate,
    with_interval,
)
from dlmprobe.analyses.plotting import figure, run_colours
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import layer_of
from dlmprobe.probes import ProbeGrid
from dlmprobe.probes.lens import ModelReaders, store_readers
from dlmprobe.probes.stats import ExampleBootstrap, readers_beside_probe, shared_fits
from dlmprobe.store import ActivationDataset

ROW_COLUMNS = ("example", "slot", "position")


def slot_read(data: ActivationDataset) -> int | None:
    """A text run's like-for-like read position: the canvas column before its answer slot."""
    return int(data.config["canvas"]["answer_start"]) - 1 if is_text_run(data) else None


def reads_of(data: ActivationDataset) -> list[str]:
    """The reads a run supports: ``own`` for a diffusion model; ``frontier`` where ``<sep>`` is stored
    (a text run: the column before its answer slot, :func:`slot_read`)."""
    reads = ["own"] if kind_of(data) == "diffusion" else []
    read = slot_read(data) if is_text_run(data) else data.target_start - 1
    if read in set(data.positions.tolist()):
        reads.append("frontier")
    return reads


def _single_class(data: ActivationDataset, label: str, target: str) -> bool:
    slots, values = data.label(label)
    y = values if target == "truth" else data.canvas[np.arange(len(slots))[:, None], -1, data.target_start + slots]
    return len(np.unique(y)) < 2


def _frontier_grids(runs: Mapping[str, ActivationDataset], target: str, steps: Sequence[int] | None,
                    settings: dict) -> dict[str, ProbeGrid]:
    """One per-distance grid per like-for-like run, every cell capped at the rows the others have."""
    text = all(is_text_run(d) for d in runs.values())
    if not text and any(is_text_run(d) for d in runs.values()):
        raise DlmprobeInputError("compare expects runs of one kind: all of built-in models or all of Hugging Face models on a text task")
    if not text:
        # From the last written token one probe per distance ahead: one feature vector cannot
        # name the tokens of several positions at once. Every cell capped at the smallest run's rows.
        grids = {name: ProbeGrid(target=target, read="frontier", per_distance=True, steps=steps, **settings) for name in runs}
        counts = {name: grid.row_counts(runs[name]) for name, grid in grids.items()}
        keys = set().union(*counts.values())
        for grid in grids.values():
            grid.max_rows = {key: min(c.get(key, 0) for c in counts.values()) for key in keys}
        return grids
    grids = {}
    for name, data in runs.items():
        run_steps = steps
        if kind_of(data) == "autoregressive":
            # The step that writes the slot's first token: the column before it is the last written one.
            run_steps = [slot_read(data) + 1 - int(data.config["canvas"]["gen_start"])]
            if run_steps[0] not in data.steps:
                raise DlmprobeInputError(f"run {name!r} does not store step {run_steps[0]}, at which it writes the answer slot")
        grids[name] = ProbeGrid(target=target, read=slot_read(data), per_distance=True, steps=run_steps, **settings)
    counts = {name: grid.row_counts(runs[name]) for name, grid in grids.items()}
    most = {name: {} for name in counts}  # run -> distance -> its most rows at any step
    for name, c in counts.items():
        for (_, distance), n in c.items():
            most[name][distance] = max(most[name].get(distance, 0), n)
    for name, grid in grids.items():
        grid.max_rows = {(step, distance): min([n] + [most[o].get(distance, 0) for o in counts if o != name])
                         for (step, distance), n in counts[name].items()}
    return grids


def runs_table(runs: Mapping[str, ActivationDataset], shared_init: bool | None) -> pd.DataFrame:
    """Every run's model, kind and task accuracy (examples whose answer label is right, Wilson 95%)."""
    records = []
    for name, data in runs.items():
        solved = np.asarray(data.solved, dtype=bool)
        rate = wilson_rate(int(solved.sum()), len(solved))
        records.append({"run": name, "model": data.config.get("model", {}).get("name"), "kind": kind_of(data),
                        "task_accuracy": rate["rate"], "task_accuracy_ci_low": rate["ci_low"],
                        "task_accuracy_ci_high": rate["ci_high"], "n_examples": rate["n"], "shared_init": shared_init})
    return pd.DataFrame(records)


def compare_runs(
    runs: Mapping[str, ActivationDataset],
    label: str | None = None,
    sites: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    folds: int = 5,
    bootstrap: int = 200,
    progress: bool = True,
    targets: Sequence[str] = ("output", "truth"),
    readers: Mapping[str, ModelReaders] | None = None,
    shared_init: bool | None = None,
) -> AnalysisResult:
    """Before-commit probe accuracy of every run, like for like at the last written token, then at own positions.

    Args:
        runs: name -> store; the names label the curves (e.g. ``"diffusion"``, ``"autoregressive"``,
            ``"diffusion, left-to-right"``). All must be of one task.
        label: the label decoded (default: the task's answer label).
        sites: sites probed (default: those every run stores); steps: a subset of the stored steps
            (each run must store them).
        targets: the label definitions read like for like (``output``, ``truth``).
        readers: per run name, the model's read-out and embeddings (default: each store's model).
        shared_init: whether the models share an initialisation (a matched pair such as Dream-7B
            and Qwen2.5-7B); None: not stated. Recorded in ``meta``, the ``runs`` table and the summary.
    """
    if not runs:
        raise DlmprobeInputError("compare_runs needs at least one run")
    tasks = {name: task_key(d) for name, d in runs.items()}
    if len(set(tasks.values())) > 1:
        raise DlmprobeInputError(f"runs must be of one task with the same options, got {tasks}")
    if not targets or set(targets) - {"output", "truth"}:
        raise DlmprobeInputError(f"targets must be 'output' and/or 'truth', got {list(targets)}")
    first = next(iter(runs.values()))
    label = default_label(first, label)
    common = [s for s in first.sites if all(s in d.sites for d in runs.values())]
    sites = list(sites) if sites is not None else common
    if not sites:
        raise DlmprobeInputError(f"the runs share no site: {[d.sites for d in runs.values()]}")
    for name, data in runs.items():
        check_slot_read_on_canvas(name, data)  # DiffusionGemma with the plain template: that column is in its encoder
        if not reads_of(data):
            where = ("the column before its answer slot; record it with --positions answer-slot" if is_text_run(data)
                     else "the <sep> position; record it with positions='sep+target'")
            raise DlmprobeInputError(f"run {name!r} ({data.path.name}) is autoregressive but does not store {where}")
    readers = _ReadersOnce(runs, readers or {})
    # The prompt one-hot is left out: as wide as prompt x vocabulary, it is the costliest baseline
    # to fit per (step, distance) cell (4x the probes' time on sudoku); decodability fits it per step.
    # No per-cell intervals: only the pooled rows are read (``_pool`` resamples them), not the grids' tables.
    settings = {"label": label, "sites": sites, "folds": folds, "bootstrap": 0,
                "control": False, "random_baseline": False, "baselines": ("position", "embedding", "givens")}
    frontier = {name: data for name, data in runs.items() if "frontier" in reads_of(data)}
    rows, cells, notes, skipped = [], [], {}, []
    # The grids fit many identical cells (e.g. every run's baselines at step 0 on the same puzzles,
    # a run's output and truth where they agree): each distinct one is fitted once.
    with shared_fits():
        for target in targets:
            if any(_single_class(data, label, target) for data in frontier.values()):
                skipped.append(f"`{label}` ({target}) read like for like: one run has a single class there")
                continue
            for name, grid in _frontier_grids(frontier, target, steps, settings).items():
                rows.append(_run_rows(grid, frontier[name], name, progress, readers.get(name), cells, notes))
        for name, data in runs.items():
            if "own" in reads_of(data):
                if _single_class(data, label, "output"):
                    skipped.append(f"`{name}` at its own positions: it commits a single class there")
                    continue
                rows.append(_run_rows(ProbeGrid(target="output", read="own", steps=steps, **settings), data, name,
                                      progress, readers.get(name), cells, notes))
    if not rows:
        raise DlmprobeInputError(f"nothing to compare: {'; '.join(skipped)}")
    rows = pd.concat(rows, ignore_index=True)
    committed = pd.concat(cells, ignore_index=True).drop_duplicates(["run", "step"]).set_index(["run", "step"])["committed_fraction"]
    rng = np.random.default_rng(0)
    table = _pool(rows, ["run", "kind", "read", "target", "site", "layer", "step"], bootstrap, rng)
    table["committed_fraction"] = [committed[(r, s)] for r, s in zip(table["run"], table["step"])]
    table["forward_passes"] = table["step"] + 1
    table["solve_rate"] = [float(np.mean(runs[r].solved)) for r in table["run"]]
    table["like_for_like"] = table["read"] == "frontier"
    ahead = rows[rows["read"] == "frontier"]
    by_distance = _pool(ahead, ["run", "target", "site", "layer", "distance"], bootstrap, rng) if len(ahead) else pd.DataFrame()
    models = runs_table(runs, shared_init)
    tables = {"by_distance": by_distance} if len(by_distance) else {}
    if any(is_text_run(d) for d in runs.values()):
        tables["runs"] = models
    summary = _summary(rows, table, runs, label, bootstrap, notes) + _models_summary(models, shared_init, skipped)
    return AnalysisResult(
        name="compare", title=f"Diffusion vs autoregressive: decoding `{label}` before it is written, like for like",
        table=table, figure=_plot(table, by_distance), summary=summary, tables=tables,
        meta={"runs": {name: describe_run(d) for name, d in runs.items()}, "label": label, "sites": sites,
              "like_for_like_runs": list(frontier), "targets": list(targets), "readers_left_out": notes,
              "shared_init": shared_init, "left_out": skipped},
    )


class _ReadersOnce:
    """Each run's model readers (read-out and embeddings), loaded at most once for all its grids:
    the ones given, else the store's own model's (:func:`~dlmprobe.probes.lens.store_readers`)."""

    def __init__(self, runs: Mapping[str, ActivationDataset], given: Mapping[str, ModelReaders]):
        self._runs, self._readers = runs, dict(given)

    def get(self, name: str) -> ModelReaders:
        if name not in self._readers:
            self._readers[name] = store_readers(self._runs[name])
        return self._readers[name]


def _models_summary(models: pd.DataFrame, shared_init: bool | None, skipped: list[str]) -> str:
    text = "\n\nTask accuracy (the answer label right, 95% CI): " + "; ".join(
        f"`{r['run']}` ({r['model']}, {r['kind']}) {with_interval(r['task_accuracy'], r['task_accuracy_ci_low'], r['task_accuracy_ci_high'])}"
        f" of {r['n_examples']} examples" for _, r in models.iterrows()) + "."
    if shared_init is not None:
        text += (" The models share an initialisation (a matched pair): a difference between them is what the other "
                 "training changed." if shared_init else " The models do not share an initialisation.")
    else:
        text += " Whether the models share an initialisation is not stated (`--shared-init` / `--no-shared-init`)."
    if skipped:
        text += " Left out: " + "; ".join(skipped) + "."
    return text


def _run_rows(grid: ProbeGrid, data: ActivationDataset, name: str, progress: bool, readers: ModelReaders | None,
              cells: list[pd.DataFrame], notes: dict[str, str]) -> pd.DataFrame:
    """Fit one grid on one run; every probed row with its readers' hits, labelled by run, read and cell."""
    table = grid.run(data, progress=progress, readers=readers)
    cells.append(table.assign(run=name)[["run", "step", "committed_fraction"]])
    if grid.readers_note_:
        notes[name] = grid.readers_note_
    slot = "distance" if grid.per_distance else "slot"
    parts = [frame.assign(site=site, step=step, **{slot: value}) for (site, step, value), frame in grid.rows_.items()]
    read = "frontier" if isinstance(grid.read, int) else str(grid.read)  # a text run's column before its answer slot
    out = pd.concat(parts, ignore_index=True).assign(run=name, kind=kind_of(data), read=read, target=grid.target)
    out["layer"] = [-1 if layer_of(s) is None else layer_of(s) for s in out["site"]]
    return out


def _pool(rows: pd.DataFrame, keys: list[str], n_boot: int, rng: np.random.Generator) -> pd.DataFrame:
    """Every group of rows pooled into one: the probe's accuracy beside its readers', intervals over examples."""
    records = []
    for values, group in rows.groupby(keys, sort=True):
        readers = {c: group[c].to_numpy().astype(bool) for c in group.columns
                   if c in ("probe", "lens", "readout", "majority") or c.startswith("baseline_")}
        readers = {c: h for c, h in readers.items() if not group[c].isna().any()}
        # Examples are keyed by run and example: a pooled group never mixes runs, so the example id suffices.
        boot = ExampleBootstrap(group["example"].to_numpy(), n_boot, rng)
        low, high = boot.interval(readers["probe"])
        records.append({**dict(zip(keys, values)), "n_rows": len(group), "n_examples": boot.n_ids,
                        "accuracy": float(readers["probe"].mean()), "ci_low": low, "ci_high": high,
                        **readers_beside_probe(readers, boot)})
    return pd.DataFrame(records)


def _label(run: str, read: str) -> str:
    return f"{run} ({'reads own position' if read == 'own' else 'reads last written token'})"


def _plot(table: pd.DataFrame, by_distance: pd.DataFrame):
    fig, axes = figure(ncols=3, width=4.6)
    # One colour per run, the same in every panel (a run without a colour of its own gets a spare one).
    colour_of = run_colours(list(table["run"].unique()) + (list(by_distance["run"].unique()) if len(by_distance) else []))
    if len(by_distance):
        axis = axes[0]
        site = deepest_site(by_distance["site"])
        shown = by_distance[(by_distance["site"] == site) & (by_distance["target"] == by_distance["target"].iloc[0])]
        for run, group in shown.groupby("run", sort=False):
            colour = colour_of[run]
            axis.plot(group["distance"], group["accuracy"], marker=".", color=colour, label=f"{run}: probe")
            axis.fill_between(group["distance"], group["ci_low"], group["ci_high"], color=colour, alpha=0.15)
            if "readout_accuracy" in group:
                axis.plot(group["distance"], group["readout_accuracy"], ls=":", color=colour, label=f"{run}: own argmax")
        if "strongest_baseline_accuracy" in shown:
            best = shown.groupby("distance")["strongest_baseline_accuracy"].max()
            axis.plot(best.index, best.to_numpy(), ls="--", color="black", lw=0.8, label="strongest input baseline")
        axis.set_xlabel("positions ahead of the last written token")
        axis.set_ylabel("accuracy")
        axis.set_title(f"like for like: {site.split('.hook')[0]}, {shown['target'].iloc[0]}, equal rows")
        axis.legend(fontsize=6)
    for axis, read, title in ((axes[1], "frontier", "like for like, pooled over distances"),
                              (axes[2], "own", "not like for like: own position (diffusion)")):
        part = table[(table["read"] == read) & (table["target"] == "output")]
        for run, group in part.groupby("run", sort=False):
            site = group.groupby("site")["accuracy"].mean().idxmax()
            group = group[group["site"] == site].sort_values("step")
            colour = colour_of[run]
            axis.plot(group["committed_fraction"], group["accuracy"], color=colour,
                      label=f"{_label(run, read)}, layer {group['layer'].iloc[0]}")
            axis.fill_between(group["committed_fraction"], group["ci_low"], group["ci_high"], color=colour, alpha=0.15)
            axis.plot(group["committed_fraction"], group["majority"], ls="--", lw=0.8, color=colour, alpha=0.6)
        axis.set_xlabel("fraction of the output committed")
        axis.set_title(title)
        axis.legend(fontsize=6, loc="lower right")
    for axis in axes:
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[1].set_ylabel("probe accuracy, answer not yet written (dashed: majority)")
    return fig


def _summary(rows: pd.DataFrame, table: pd.DataFrame, runs: Mapping[str, ActivationDataset], label: str,
             n_boot: int, notes: dict[str, str]) -> str:
    rng = np.random.default_rng(1)
    text = f"Decoding `{label}` tokens before they are written."
    ahead = rows[rows["read"] == "frontier"]
    if len(ahead):
        site = deepest_site(ahead["site"])
        at = ahead[ahead["site"] == site]
        if all(is_text_run(d) for d in runs.values()):
            how = ("at the token before its answer slot (a causal LM at the step it writes the slot's first token, "
                   "a diffusion LM at every stored step), decoding the same slot positions ahead, every (step, "
                   "distance) cell trained on at most as many rows as any other run has at that distance")
        else:
            how = ("at its last written token, decoding the same positions ahead, every (step, distance) cell "
                   "trained on as many rows as the smallest run has there")
        text += (f"\n\n**Like for like** ({', '.join(f'`{r}`' for r in at['run'].unique())}) at {site}: every run "
                 f"read {how}; 95% intervals over examples.")
        text += (" Beside each probe: the run's own argmax at the probed position at that step (an autoregressive "
                 "model predicts only the next position, so further ahead it has none and counts as wrong) and the "
                 "strongest input-only baseline on the same rows.")
        nearest = int(at["distance"].min())
        groups = [(f"{nearest} position{'s' if nearest > 1 else ''} ahead", at["distance"] == nearest)]
        if (at["distance"] >= max(5, nearest + 1)).any():
            groups.append(("five or more ahead", at["distance"] >= max(5, nearest + 1)))
        for target in at["target"].unique():
            what = "the token the run commits" if target == "output" else "the correct value"
            for name, part in groups:
                chosen = at[(at["target"] == target) & part]
                pooled = _pool(chosen.drop(columns=["distance", "step"]), ["run"], n_boot, rng).set_index("run")
                text += f"\n- {what}, {name}: " + "; ".join(
                    f"`{run}` probe {with_interval(r['accuracy'], r['ci_low'], r['ci_high'])}"
                    + (f", its argmax {percent(r['readout_accuracy'])}" if "readout_accuracy" in r else "")
                    + (f", {r['strongest_baseline']} baseline {percent(r['strongest_baseline_accuracy'])}"
                       if "strongest_baseline" in r else "")
                    + f" ({int(r['n_rows'])} rows)"
                    for run, r in pooled.iterrows()) + "."
    missing = [name for name, d in runs.items() if "frontier" not in reads_of(d)]
    if missing:
        text += (f"\n\nNot read like for like (the store lacks the `<sep>` position or, for a text run, the column "
                 f"before its answer slot; record it with positions='sep+target' or answer-slot): "
                 f"{', '.join(f'`{m}`' for m in missing)}.")
    own = table[table["read"] == "own"]
    if len(own):
        parts = []
        for run, group in own.groupby("run", sort=False):
            site = group.groupby("site")["accuracy"].mean().idxmax()
            group = group[group["site"] == site].sort_values("step")
            start = group.iloc[0]
            parts.append(f"`{run}` at layer {start['layer']}: mean {percent(group['accuracy'].mean())} over the run, step "
                         f"{int(start['step'])} {with_interval(start['accuracy'], start['ci_low'], start['ci_high'])}"
                         + (f" (its own argmax there {percent(start['readout_accuracy'])})" if "readout_accuracy" in start else "")
                         + f"; solves {percent(start['solve_rate'])}")
        text += ("\n\nNot like for like: a diffusion model read at its own still-masked position (a position the "
                 "autoregressive twin has not computed), decoding the token it commits: " + "; ".join(parts) + ".")
    for name, note in notes.items():
        text += f" Left out for `{name}`: {note}."
    return text
