"""``demo`` (the whole chain on the shipped models) and ``report`` (an HTML page of saved analyses)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dlmprobe.cli import common
from dlmprobe.errors import DlmprobeInputError


def cmd_demo(args: argparse.Namespace) -> int:
    from dlmprobe.demo import DemoConfig, run_demo

    common.set_threads(args.threads)
    # Only the sizes given on the command line; DemoConfig holds the defaults.
    sizes = {name: getattr(args, name) for name in ("n", "n_model", "n_paraphrase", "n_causal", "n_compare", "record_every",
                                                     "processes")
             if getattr(args, name) is not None}
    config = DemoConfig(seed=args.seed, **sizes)
    report = run_demo(args.out, config)
    print(f"\nreport: {report.resolve()}\n(open it in a browser; the tables behind it are in {report.parent / 'results'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dlmprobe.report import write_report

    folder = Path(args.folder)
    if not folder.is_dir():
        raise DlmprobeInputError(f"expected a folder of saved analyses (from dlmprobe analyze or demo), got {args.folder!r}")
    out = Path(args.out) if args.out else folder / "report.html"
    common.check_output(out, args)
    print(f"wrote {write_report(folder, out, title=args.title)}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="the main job: sample, capture, probe, analyse and report on the shipped models",
                            parents=[common.seed(), common.threads()])
    p.add_argument("--out", default="runs/demo", help="folder for the datasets, results and report.html (replaced)")
    p.add_argument("--n", type=common.positive_int, help="held-out puzzles per activation dataset (default 128)")
    p.add_argument("--n-model", type=common.positive_int, help="puzzles for faithfulness (default 128)")
    p.add_argument("--n-paraphrase", type=common.positive_int, help="puzzles for paraphrase (default 48)")
    p.add_argument("--n-causal", type=common.positive_int, help="fresh puzzles for the causal check (default 20)")
    p.add_argument("--n-compare", type=common.positive_int,
                   help="puzzles of the twin's and the sampler controls' datasets, read by compare alone (default 64)")
    p.add_argument("--record-every", type=int, help="record every k-th denoising step (default 4)")
    p.add_argument("--processes", type=int, help="processes the stages run in: 2 (default; each with --threads "
                                                 "torch threads) or 1")
    p.set_defaults(func=cmd_demo)

    p = commands.add_parser("report", help="a self-contained HTML page from a folder of saved analyses",
                            parents=[common.overwrite()])
    p.add_argument("folder", help="a folder of saved analyses (from dlmprobe analyze or demo)")
    p.add_argument("--out", help="the HTML file (default FOLDER/report.html)")
    p.add_argument("--title", default="dlmprobe report")
    p.set_defaults(func=cmd_report)
