"""The main job: sample, capture, probe, analyse and report on the built-in models, end to end.

``dlmprobe demo`` runs :func:`run_demo`: it records activation datasets of the shipped sudoku
denoiser (its default order, forced left-to-right and random order) and of its autoregressive twin,
every one with the ``<sep>`` position so that all are compared like for like, runs the eight
analyses on them (faithfulness and commit order also on arith, whose target writes intermediate
results before the answer; the diffusion-vs-autoregressive comparison also on path-star, whose arm
only the far-away goal decides), and writes ``report.html`` with every figure and table.

Example:
    >>> report = run_demo("runs/demo", n=192)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlmprobe.analyses import (
    causal_check,
    commit_order,
    compare_runs,
    decodability,
    faithfulness,
    paraphrase_run,
    planning_lead,
    trajectory_view,
)
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.capture import CacheConfig, run_cache
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import load_model
from dlmprobe.probes import ProbeGrid
from dlmprobe.report import write_report
from dlmprobe.store import ActivationDataset


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults take a few minutes on 2 CPU cores.

    ``record_every``: record every k-th of sudoku's 36 denoising steps (probes are fitted per
    stored step). ``n``: puzzles per activation dataset; ``n_model``: puzzles per model-based
    analysis (faithfulness, paraphrase); ``n_causal``: fresh puzzles for the causal check, which
    samples them once per intervention and start step. ``compare_every``: the like-for-like
    comparison fits one probe per (step, distance ahead, site), so it reads every k-th stored
    step, at ``probe_site`` only.
    """

    n: int = 128
    n_model: int = 128
    record_every: int = 4
    compare_every: int = 2
    seed: int = 0
    sites: list[str] = field(default_factory=lambda: ["blocks.*.hook_resid_post"])
    probe_site: str = "blocks.3.hook_resid_post"
    causal_site: str = "blocks.1.hook_resid_post"
    n_causal: int = 96
    # From step 0 only by default: a later start re-samples every condition from there (minutes here).
    causal_start_steps: tuple[int, ...] = (0,)
    example: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "n_model", "n_causal", "record_every", "compare_every"):
            if getattr(self, name) < 1:
                raise DlmprobeInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n < 10:
            raise DlmprobeInputError(f"the demo probes with 5 folds by example and needs n >= 10 puzzles, got {self.n}")


def run_demo(out: str | Path = "runs/demo", config: DemoConfig | None = None, overwrite: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Run the whole chain into ``out`` and return the path of the report."""
    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, results_dir = out / "data", out / "results"
    if results_dir.exists():  # the demo's own folder: a rerun replaces it, stale results never mix in
        shutil.rmtree(results_dir)
    clock = StageClock(log)

    def cache(name: str, model: str, positions: str, sampler: dict | None = None, sites: list[str] | None = None,
              n: int | None = None, every: int | None = None) -> ActivationDataset:
        path = data_dir / f"{name}.h5"
        cache_config = CacheConfig(model=model, n=n or config.n, seed=config.seed, sites=sites or config.sites,
                                   steps=every or config.record_every, positions=positions, sampler=sampler or {})
        with clock.stage(f"cache {name}", f"sample + capture {name} -> {path}"):
            run_cache(cache_config, path, overwrite=overwrite, progress=False)
        return ActivationDataset(path)

    def keep(result: AnalysisResult, name: str | None = None) -> AnalysisResult:
        if name:
            result.name = name
        folder = result.save(results_dir)
        clock.log(f"{result.name}: {result.summary.splitlines()[0][:160]}…  -> {folder}")
        return result

    # Every compared run stores <sep>, so that all can be read where a twin is: at the last written token.
    sudoku = cache("sudoku-diffusion", "sudoku-diffusion", "sep+target")
    twin = cache("sudoku-autoregressive", "sudoku-autoregressive", "sep+target")
    left_to_right = cache("sudoku-diffusion-left-to-right", "sudoku-diffusion", "sep+target", {"block_length": 1})
    random_order = cache("sudoku-diffusion-random-order", "sudoku-diffusion", "sep+target", {"order": "random"})
    arith = cache("arith-diffusion", "arith-diffusion", "target", sites=[config.probe_site], n=256, every=1)
    paths = cache("pathstar-diffusion", "pathstar-diffusion", "sep+target", every=1)
    paths_twin = cache("pathstar-autoregressive", "pathstar-autoregressive", "sep+target", every=1)

    with clock.stage("1 decodability", "1 decodability over time (probe grid beside the logit lens, input baselines, "
                                       "strata, clock)"):
        grid = ProbeGrid(label="blank", bootstrap=200)  # decodability's settings
        keep(decodability(sudoku, grid=grid))
    with clock.stage("2 planning lead"):
        predicted = grid.out_of_fold(sudoku)[config.probe_site]  # the probes decodability fitted, not refitted
        keep(planning_lead(sudoku, label="blank", site=config.probe_site, predicted=predicted))
    with clock.stage("3 compare", "3 diffusion vs autoregressive, like for like; left-to-right and random order as "
                                  "sampler controls"):
        keep(compare_runs({"diffusion": sudoku, "autoregressive": twin, "diffusion, left-to-right": left_to_right,
                           "diffusion, random order": random_order},
                          label="blank", sites=[config.probe_site], steps=sudoku.steps[::config.compare_every].tolist()))
        # Path-star: only the far-away goal decides the arm; does either model know it before writing it?
        keep(compare_runs({"diffusion": paths, "autoregressive": paths_twin}, label="arm"), "compare-pathstar")
    with clock.stage("4 commit order"):
        keep(commit_order(sudoku, answer="blank"))
        keep(commit_order(arith, answer="answer", reasoning="intermediate"), "order-arith")
    with clock.stage("5 faithfulness", "5 faithfulness along time (arith, diffusion and its twin)"):
        keep(faithfulness(load_model("arith-diffusion"), n=config.n_model, seed=config.seed,
                          twin=load_model("arith-autoregressive"), progress=False))
    with clock.stage("6 paraphrase", "6 paraphrase between steps (sudoku digit relabelling)"):
        sudoku_model = load_model("sudoku-diffusion")
        keep(paraphrase_run(sudoku_model, n=config.n_model, seed=config.seed, probe_site=config.probe_site,
                            label="blank", paraphrases=("tokens", "commits")))
    with clock.stage("7 causal check", "7 causal check of the probe direction"):
        # Layer 1: at the last layer an erasure removes what the unembedding reads, which proves little.
        keep(causal_check(sudoku_model, sudoku, config.causal_site, label="blank", n=config.n_causal,
                          seed=config.seed + 1, start_steps=list(config.causal_start_steps)))
    with clock.stage("8 trajectory view"):
        keep(trajectory_view(sudoku, example=config.example,
                             probe=_spread(predicted, sudoku, config.example, "blank")))

    with clock.stage("report"):
        report = write_report(results_dir, out / "report.html", title="dlmprobe demo: do small diffusion LMs plan?",
                              intro=_intro(config, {"sudoku-diffusion": sudoku, "sudoku-autoregressive": twin,
                                                   "sudoku-diffusion-left-to-right": left_to_right,
                                                   "sudoku-diffusion-random-order": random_order, "arith-diffusion": arith,
                                                   "pathstar-diffusion": paths, "pathstar-autoregressive": paths_twin}))
    clock.log(f"report written: {report}")
    clock.finish(results_dir / "timings.json")
    return report


class StageClock:
    """Wall and CPU time of each stage of a run, logged as it goes and tabled at the end.

    CPU time (``time.process_time``: every thread of this process) is kept beside wall time
    because on a shared machine the wall time also counts the other jobs' turns on the cores.
    """

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self.started = time.perf_counter()
        self._cpu_started = time.process_time()
        self._load_start = os.getloadavg()
        self.stages: list[dict[str, float | str]] = []

    def log(self, text: str) -> None:
        self._log(f"[{time.perf_counter() - self.started:6.0f} s] {text}")

    @contextmanager
    def stage(self, name: str, text: str | None = None) -> Iterator[None]:
        self.log(text or name)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.stages.append({"stage": name, "wall_s": round(time.perf_counter() - wall, 2),
                            "cpu_s": round(time.process_time() - cpu, 2)})

    def finish(self, path: Path) -> None:
        """Log the table of stages and write it, with the totals and the machine's load, to ``path``."""
        total = {"wall_s": round(time.perf_counter() - self.started, 2),
                 "cpu_s": round(time.process_time() - self._cpu_started, 2)}
        width = max(len(str(row["stage"])) for row in self.stages)
        self._log(f"{'stage':<{width}}  {'wall s':>7}  {'cpu s':>7}")
        for row in [*self.stages, {"stage": "total", **total}]:
            self._log(f"{row['stage']:<{width}}  {row['wall_s']:>7.1f}  {row['cpu_s']:>7.1f}")
        path.write_text(json.dumps({"stages": self.stages, "total": total, "cpus": os.cpu_count(),
                                    "load_average_start": [round(x, 2) for x in self._load_start],
                                    "load_average_end": [round(x, 2) for x in os.getloadavg()]}, indent=1) + "\n")


def _spread(predicted: np.ndarray, data: ActivationDataset, example: int, label: str) -> np.ndarray:
    """One example's out-of-fold probe guesses, (stored steps, slots), laid out as the trajectory
    view wants them: (n_steps, target_length) token ids, -1 where no probe was read."""
    slots, _ = data.label(label)
    out = np.full((data.n_steps, data.output.shape[1]), -1, dtype=np.int64)
    for i, step in enumerate(data.steps):
        out[step, slots[example]] = predicted[example, i]
    return out


def _intro(config: DemoConfig, runs: dict[str, ActivationDataset]) -> str:
    """What the demo ran, read back from the datasets themselves."""
    lines = []
    for name, data in runs.items():
        model = data.config["model"]
        task = data.config["task"]
        sampler = {k: v for k, v in data.config.get("sampler", {}).items() if v is not None and k != "seed"}
        lines.append(
            f"- `{name}`: {model['name']} ({model['kind']}, {model['config']['n_layers']} layers, d_model "
            f"{model['config']['d_model']}) on {task['name']} {task['params']}, sampler {sampler}; {data.n_examples} "
            f"held-out puzzles, {len(data.steps)} of {data.n_steps} steps, sites {', '.join(data.sites)}; "
            f"solves {100 * float(data.solved.mean()):.0f}%."
        )
    return (
        "Activation datasets behind the probes:\n\n" + "\n".join(lines) + "\n\n"
        f"Probes are 5-fold by puzzle with bootstrap 95% intervals over puzzles. Faithfulness and paraphrase "
        f"sample {config.n_model} held-out puzzles, the causal check {config.n_causal} fresh ones."
    )
