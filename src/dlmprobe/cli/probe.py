"""``probe``: a grid of linear probes (site x step) with controls, written as tables."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from dlmprobe.choices import PROBE_PHASES, PROBE_TARGETS
from dlmprobe.cli import common

Writer = Callable[[Path], object]  # writes one output file at the path it is given


def cmd_probe(args: argparse.Namespace) -> int:
    from dlmprobe.analyses.common import default_label
    from dlmprobe.probes import ProbeGrid, clock_table
    from dlmprobe.store import ActivationDataset

    device = common.chosen_device(args)
    out = Path(args.out)
    with ActivationDataset(common.input_file(args.dataset)) as data:
        label = default_label(data, args.label)
        stem = f"{label}-{args.target}-{args.phase}"
        table_path = out / f"grid-{stem}.{args.format}"
        common.check_output(table_path, args)
        steps = common.select_steps(args.steps, data.steps)
        common.set_threads(args.threads)
        grid = ProbeGrid(label=label, target=args.target, read=args.read, phase=args.phase,
                         per_slot=args.per_slot, sites=args.sites, steps=steps, folds=args.folds, C=args.C,
                         control=not args.no_control, random_baseline=not args.no_random_baseline,
                         mdl=args.mdl, seed=args.seed, device=str(device))
        table = grid.run(data, progress=not args.quiet)
        clock = clock_table(data, grid.label, sites=args.sites, folds=args.folds, seed=args.seed)
    settings = {"dataset": str(args.dataset), "settings": grid.settings(), "skipped": grid.skipped_}
    write_table = table.to_parquet if args.format == "parquet" else table.to_csv
    _save(table_path, lambda file: write_table(file, index=False), {
        out / f"grid-{stem}.json": lambda file: file.write_text(json.dumps(settings, indent=2) + "\n"),
        out / f"clock-{grid.label}.csv": lambda file: clock.to_csv(file, index=False),
    })
    print(_summary(table, clock))
    if grid.skipped_:
        print(f"skipped {len(grid.skipped_)} cells with too few rows (e.g. {grid.skipped_[0]})")
    print(f"wrote {table_path} ({len(table)} cells)")
    return 0


def _save(table_path: Path, write_table: Writer, others: dict[Path, Writer]) -> None:
    """Write every file beside its place, then rename them in, the table last: the table is the
    commit marker that ``check_output`` looks for, so a killed save leaves no table and a plain rerun
    replaces the other files; a failed save renames nothing and leaves no folder it made."""
    from dlmprobe.files import atomic_file

    for path in (table_path, *others):
        common.sweep_leftovers(path)
    with ExitStack() as renames:  # renames happen as it unwinds, last entered first
        table_tmp = renames.enter_context(atomic_file(table_path))
        for path, write in others.items():
            write(renames.enter_context(atomic_file(path)))
        write_table(table_tmp)


def _summary(table, clock) -> str:
    """Best step per site, and the clock confound, as a terminal table."""
    lines = [(f"{'site':<28} {'best step':>9} {'acc':>6} {'95% CI':>13} {'majority':>8} {'control':>8} "
              f"{'random-w':>8} {'clock acc':>9}")]
    for site, rows in table.groupby("site", sort=False):
        best = rows.loc[rows["accuracy"].idxmax()]
        clock_acc = clock.loc[clock["site"] == site, "step_accuracy"]
        lines.append(
            f"{site:<28} {int(best['step']):>9} {best['accuracy']:>6.3f} "
            f"{f'[{best.ci_low:.3f}, {best.ci_high:.3f}]':>13} {best['majority']:>8.3f} "
            f"{best.get('control_accuracy', float('nan')):>8.3f} {best.get('random_weights_accuracy', float('nan')):>8.3f} "
            f"{(clock_acc.iloc[0] if len(clock_acc) else float('nan')):>9.3f}"
        )
    return "\n".join(lines)


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "probe", help="train a grid of linear probes (site x step) with controls on an activation dataset",
        parents=[common.seed(), common.threads(), common.device("the probes are fitted"), common.quiet(),
                 common.overwrite()])
    p.add_argument("dataset", help="HDF5 file written by dlmprobe cache")
    p.add_argument("--label", help="task label to decode (default: the task's answer label)")
    p.add_argument("--target", choices=PROBE_TARGETS, default="output",
                   help="the token the model finally commits, or the correct answer")
    p.add_argument("--read", type=common.read_rule, default="own",
                   help="'own' (the label position), 'pooled', 'frontier' (last written token; autoregressive "
                        "read-ahead) or a canvas position")
    p.add_argument("--phase", choices=PROBE_PHASES, default="before_commit")
    p.add_argument("--per-slot", action="store_true", help="one probe per label slot")
    p.add_argument("--sites", nargs="+", help="subset of the stored sites")
    p.add_argument("--steps", type=common.steps_spec, default="all",
                   help="stored steps: 'all', every K-th ('every:K') or a list such as 0,4,8")
    p.add_argument("--folds", type=common.positive_int, default=5)
    p.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (scikit-learn's C)")
    p.add_argument("--no-control", action="store_true", help="skip the control task")
    p.add_argument("--no-random-baseline", action="store_true", help="skip the random-weights baseline")
    p.add_argument("--mdl", action="store_true", help="also compute online-code description length")
    p.add_argument("--format", choices=("csv", "parquet"), default="csv")
    p.add_argument("--out", required=True, help="folder for the tables")
    p.set_defaults(func=cmd_probe)
