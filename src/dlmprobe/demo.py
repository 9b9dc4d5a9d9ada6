"""The main job: sample, capture, probe, analyse and report on the built-in models, end to end.

``dlmprobe demo`` runs :func:`run_demo`: it records activation datasets of the shipped sudoku
denoiser (its default order, forced left-to-right and random order) and of its autoregressive twin,
every one with the ``<sep>`` position so that all are compared like for like, runs the eight
analyses on them (faithfulness and commit order also on arith, whose target writes intermediate
results before the answer; the diffusion-vs-autoregressive comparison also on path-star, whose arm
only the far-away goal decides), and writes ``report.html`` with every figure and table.

Example:
    >>> report = run_demo("runs/demo", DemoConfig(n=192))
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.process
import multiprocessing.queues
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dlmprobe.analyses import (
    causal_check,
    commit_order,
    compare_runs,
    decodability,
    faithfulness,
    paraphrase_run,
    planning_lead,
    seed_spread,
    trajectory_view,
)
from dlmprobe.analyses.result import AnalysisResult
from dlmprobe.capture import CacheConfig, run_cache
from dlmprobe.errors import DlmprobeInputError
from dlmprobe.models import load_model, resolve_checkpoint, shipped_checkpoints
from dlmprobe.models.checkpoint import read_config
from dlmprobe.probes import ProbeGrid
from dlmprobe.report import write_report
from dlmprobe.store import ActivationDataset


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults aim at two minutes on 2 idle CPU cores (two processes).

    ``record_every``: record every k-th of sudoku's 36 denoising steps (probes are fitted per
    stored step). ``n``: puzzles per activation dataset; ``n_model``: puzzles for faithfulness;
    ``n_paraphrase``: for paraphrase (three sampling runs: plain, relabelled, remasked);
    ``n_causal``: fresh puzzles for the causal check, which samples them once per condition (11
    conditions and the clean run); ``n_compare``: puzzles of the twin's and the two sampler
    controls' datasets, which only compare reads (it uses the same number of rows from every run,
    the smallest). These are smaller than ``n`` so that the demo fits in two minutes on two cores:
    sampling is most of its time, and the effects they measure are large beside their intervals
    (the causal check's label-specific effects are tens of points). ``compare_every``: the
    like-for-like comparison fits one probe per (step, distance ahead, site), so it reads every
    k-th stored step, at ``probe_site`` only. ``processes``: 2 runs the stages in two processes
    (about half the wall time on two free cores), 1 in this one.
    """

    n: int = 128
    n_model: int = 128
    record_every: int = 4
    compare_every: int = 3
    seed: int = 0
    sites: list[str] = field(default_factory=lambda: ["blocks.*.hook_resid_post"])
    probe_site: str = "blocks.3.hook_resid_post"
    causal_site: str = "blocks.1.hook_resid_post"
    n_paraphrase: int = 48
    n_causal: int = 20
    n_compare: int = 64
    # From step 0 only by default: a later start re-samples every condition from there (minutes here).
    causal_start_steps: tuple[int, ...] = (0,)
    example: int = 0
    processes: int = 2

    def __post_init__(self) -> None:
        for name in ("n", "n_model", "n_paraphrase", "n_causal", "n_compare", "record_every", "compare_every"):
            if getattr(self, name) < 1:
                raise DlmprobeInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.processes not in (1, 2):
            raise DlmprobeInputError(f"processes must be 1 or 2, got {self.processes}")
        if self.n < 10:
            raise DlmprobeInputError(f"the demo probes with 5 folds by example and needs n >= 10 puzzles, got {self.n}")


def run_demo(out: str | Path = "runs/demo", config: DemoConfig | None = None, overwrite: bool = True,
             log: Callable[[str], None] = print) -> Path:
    """Run the whole chain into ``out`` and return the path of the report.

    With ``config.processes == 2`` the stages run in two processes (this one and a spawned worker,
    each with this process's torch threads): this one records the sudoku denoiser's main dataset
    and runs decodability, planning lead, commit order, the trajectory view, faithfulness and the
    causal check; the worker records the other datasets and runs compare, the seed spread and
    paraphrase, starting compare once this process has written the sudoku dataset. If the worker
    fails, this process stops at its next stage with the worker's error.
    """
    config = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_dir = out / "results"
    if results_dir.exists():  # the demo's own folder: a rerun replaces it, stale results never mix in
        shutil.rmtree(results_dir)
    clock = StageClock(log)
    if config.processes == 1:
        ready = threading.Event()
        runs = _main_part(out, config, overwrite, clock, ready)
        runs.update(_worker_part(out, config, overwrite, clock, ready))
        worker_clock = None
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pools
        ready, answers = context.Event(), context.Queue()
        worker = context.Process(target=_worker, name="dlmprobe-demo-worker", daemon=True,
                                 args=(out, config, overwrite, ready, answers, clock.epoch, torch.get_num_threads()))
        worker.start()
        answered: list[dict] = []

        def check_worker() -> None:
            """Before each stage of this process: stop here if the worker has failed."""
            if not answered:
                try:
                    answered.append(json.loads(answers.get_nowait()))
                except queue.Empty:
                    return
            _raise_error(answered[0])

        clock.before_stage = check_worker
        try:
            runs = _main_part(out, config, overwrite, clock, ready)
            clock.before_stage = None
            clock.log("waiting for the worker process")
            answer = answered[0] if answered else _answer_of(worker, answers)
            _raise_error(answer)
        except BaseException:
            if worker.is_alive():
                worker.terminate()
            raise
        worker.join()
        runs.update({name: ActivationDataset(path) for name, path in answer["runs"].items()})
        worker_clock = answer["clock"]

    with clock.stage("report"):
        order = ["sudoku-diffusion", "sudoku-autoregressive", "sudoku-diffusion-left-to-right",
                 "sudoku-diffusion-random-order", "arith-diffusion", "pathstar-diffusion", "pathstar-autoregressive"]
        report = write_report(results_dir, out / "report.html", title="dlmprobe demo: do small diffusion LMs plan?",
                              intro=_intro(config, {name: runs[name] for name in order}))
    clock.log(f"report written: {report}")
    clock.finish(results_dir / "timings.json", worker_clock)
    return report


def _raise_error(answer: dict) -> None:
    if answer["error"] is not None:
        kind, message = answer["error"]
        if kind == "DlmprobeInputError":
            raise DlmprobeInputError(message)
        raise RuntimeError(f"the demo's worker process failed: {message}")


def _answer_of(worker: multiprocessing.process.BaseProcess, answers: multiprocessing.queues.Queue) -> dict:
    """The worker's answer; an error if it died without one."""
    while True:
        try:
            return json.loads(answers.get(timeout=1.0))  # plain JSON text: nothing but data crosses
        except queue.Empty:
            if not worker.is_alive():
                return {"error": ("RuntimeError", f"it exited with code {worker.exitcode} and no answer"),
                        "runs": {}, "clock": None}


def _worker(out: Path, config: DemoConfig, overwrite: bool, ready, answers, epoch: float, threads: int) -> None:
    """The second process: its stages, then one answer (datasets, stage times, or the error)."""
    torch.set_num_threads(threads)
    clock = StageClock(lambda text: print(text, flush=True), epoch=epoch, prefix="worker ")
    # Starting: interpreter and imports (torch, TransformerLens), before this function ran.
    clock.stages.append({"stage": "worker start (imports)", "wall_s": round(time.time() - epoch, 2),
                         "cpu_s": round(time.process_time(), 2)})
    try:
        runs = _worker_part(out, config, overwrite, clock, ready)
        answers.put(json.dumps({"error": None, "runs": {name: str(d.path) for name, d in runs.items()},
                                "clock": clock.totals()}))
    except BaseException as err:  # noqa: BLE001 - handed to the main process, which raises it
        answers.put(json.dumps({"error": (type(err).__name__, f"{type(err).__name__}: {err}"), "runs": {}, "clock": None}))


def _cache(out: Path, config: DemoConfig, overwrite: bool, clock: StageClock, name: str, model: str, positions: str,
           sampler: dict | None = None, sites: list[str] | None = None, n: int | None = None,
           every: int | list[int] | None = None) -> ActivationDataset:
    path = out / "data" / f"{name}.h5"
    cache_config = CacheConfig(model=model, n=n or config.n, seed=config.seed, sites=sites or config.sites,
                               steps=every or config.record_every, positions=positions, sampler=sampler or {})
    with clock.stage(f"cache {name}", f"sample + capture {name} -> {path}"):
        run_cache(cache_config, path, overwrite=overwrite, progress=False)
    return ActivationDataset(path)


def _keeper(out: Path, clock: StageClock) -> Callable[..., AnalysisResult]:
    def keep(result: AnalysisResult, name: str | None = None) -> AnalysisResult:
        if name:
            result.name = name
        folder = result.save(out / "results")
        clock.log(f"{result.name}: {result.summary.splitlines()[0][:160]}…  -> {folder}")
        return result
    return keep


def _main_part(out: Path, config: DemoConfig, overwrite: bool, clock: StageClock,
               ready: threading.Event) -> dict[str, ActivationDataset]:
    """The sudoku denoiser's main dataset and the analyses of it alone (decodability, lead, commit
    order, trajectory view), faithfulness (arith) and the causal check (which samples fresh
    puzzles)."""
    keep = _keeper(out, clock)
    # Every compared run stores <sep>, so that all can be read where a twin is: at the last written token.
    sudoku = _cache(out, config, overwrite, clock, "sudoku-diffusion", "sudoku-diffusion", "sep+target")
    ready.set()  # the worker's compare and seed spread read it
    with clock.stage("1 decodability", "1 decodability over time (probe grid beside the logit lens, input baselines, "
                                       "strata, clock)"):
        grid = ProbeGrid(label="blank", bootstrap=200)  # decodability's settings
        keep(decodability(sudoku, grid=grid))
    with clock.stage("2 planning lead"):
        predicted = grid.out_of_fold(sudoku)[config.probe_site]  # the probes decodability fitted, not refitted
        keep(planning_lead(sudoku, label="blank", site=config.probe_site, predicted=predicted))
    with clock.stage("4 commit order"):
        keep(commit_order(sudoku, answer="blank"))
    with clock.stage("8 trajectory view"):
        keep(trajectory_view(sudoku, example=config.example,
                             probe=_spread(predicted, sudoku, config.example, "blank")))
    with clock.stage("5 faithfulness", "5 faithfulness along time (arith, diffusion and its twin)"):
        keep(faithfulness(load_model("arith-diffusion"), n=config.n_model, seed=config.seed,
                          twin=load_model("arith-autoregressive"), progress=False))
    with clock.stage("7 causal check", "7 causal check of the probe direction"):
        # Layer 1: at the last layer an erasure removes what the unembedding reads, which proves little.
        keep(causal_check(load_model("sudoku-diffusion"), sudoku, config.causal_site, label="blank", n=config.n_causal,
                          seed=config.seed + 1, start_steps=list(config.causal_start_steps), progress=False))
    return {"sudoku-diffusion": sudoku}


def _seeds(out: Path, config: DemoConfig, overwrite: bool, clock: StageClock, keep: Callable, base: str,
           recorded: ActivationDataset) -> None:
    """The step-0 headline numbers over every shipped training seed of ``base`` (9, seed spread).

    Step 0's activations depend only on the step-0 canvas (prompt and masks), not on the sampler's
    later steps, so each other seed's dataset samples one step (``base`` itself is read from
    ``recorded``, its full run on the same puzzles); the probes decode the correct digit, the label
    every seed shares (the committed one where a seed solves the puzzle)."""
    names = [n for n in shipped_checkpoints() if re.fullmatch(rf"{re.escape(base)}(-seed\d+)?", n)]
    models = {read_config(resolve_checkpoint(n))[0].seed: n for n in names}
    if len(models) < 2:
        clock.log(f"9 seed spread skipped: only {len(models)} training seed of {base} is shipped")
        return
    runs = {seed: recorded if name == base else _cache(out, config, overwrite, clock, f"{name}-step0", name, "target",
                                                       {"steps": 1}, sites=[config.probe_site], every=[0])
            for seed, name in sorted(models.items())}
    with clock.stage("9 seed spread", f"9 the step-0 numbers over {len(runs)} training seeds of {base}"):
        keep(seed_spread(runs, label="blank", target="truth", site=config.probe_site, step=0, note=(
            "Each seed's dataset holds step 0 only (its activations depend on the step-0 canvas alone, not on "
            "the sampler's later steps); the probes decode the correct digit, which is the committed one "
            "wherever a seed solves the puzzle (see MODELS.md for each seed's exact-solve rate).")), "seeds")


def _compared(config: DemoConfig) -> dict:
    """The sampler controls and the twin are read by compare alone: at the probed site, at its steps,
    ``n_compare`` puzzles (the first of the main dataset's: the same seed)."""
    return {"sites": [config.probe_site], "every": config.record_every * config.compare_every, "n": config.n_compare}


def _worker_part(out: Path, config: DemoConfig, overwrite: bool, clock: StageClock,
                 ready: threading.Event) -> dict[str, ActivationDataset]:
    """The other datasets, compare (both tasks), the seed spread, the arith commit order and paraphrase."""
    keep = _keeper(out, clock)
    compared = _compared(config)
    twin = _cache(out, config, overwrite, clock, "sudoku-autoregressive", "sudoku-autoregressive", "sep+target", **compared)
    random_order = _cache(out, config, overwrite, clock, "sudoku-diffusion-random-order", "sudoku-diffusion",
                          "sep+target", {"order": "random"}, **compared)
    left_to_right = _cache(out, config, overwrite, clock, "sudoku-diffusion-left-to-right", "sudoku-diffusion",
                           "sep+target", {"block_length": 1}, **compared)
    arith = _cache(out, config, overwrite, clock, "arith-diffusion", "arith-diffusion", "target",
                   sites=[config.probe_site], n=256, every=1)
    paths = _cache(out, config, overwrite, clock, "pathstar-diffusion", "pathstar-diffusion", "sep+target", every=1)
    paths_twin = _cache(out, config, overwrite, clock, "pathstar-autoregressive", "pathstar-autoregressive",
                        "sep+target", every=1)
    with clock.stage("3 compare", "3 diffusion vs autoregressive, like for like; left-to-right and random order as "
                                  "sampler controls"):
        # Path-star: only the far-away goal decides the arm; does either model know it before writing it?
        keep(compare_runs({"diffusion": paths, "autoregressive": paths_twin}, label="arm", progress=False),
             "compare-pathstar")
        if not ready.wait(timeout=3600):
            raise RuntimeError("the sudoku-diffusion cache was not written within an hour")
        sudoku = ActivationDataset(out / "data" / "sudoku-diffusion.h5")
        keep(compare_runs({"diffusion": sudoku, "autoregressive": twin, "diffusion, left-to-right": left_to_right,
                           "diffusion, random order": random_order},
                          label="blank", sites=[config.probe_site], steps=sudoku.steps[::config.compare_every].tolist(),
                          progress=False))
    _seeds(out, config, overwrite, clock, keep, "sudoku-diffusion", recorded=sudoku)
    with clock.stage("4 commit order (arith)"):
        keep(commit_order(arith, answer="answer", reasoning="intermediate"), "order-arith")
    with clock.stage("6 paraphrase", "6 paraphrase between steps (sudoku digit relabelling)"):
        keep(paraphrase_run(load_model("sudoku-diffusion"), n=config.n_paraphrase, seed=config.seed,
                            probe_site=config.probe_site, label="blank", paraphrases=("tokens", "commits"),
                            progress=False))
    return {"sudoku-autoregressive": twin, "sudoku-diffusion-random-order": random_order,
            "sudoku-diffusion-left-to-right": left_to_right, "arith-diffusion": arith, "pathstar-diffusion": paths,
            "pathstar-autoregressive": paths_twin}


class StageClock:
    """Wall and CPU time of each stage of a run, logged as it goes and tabled at the end.

    CPU time (``time.process_time``: every thread of this process) is kept beside wall time
    because on a shared machine the wall time also counts the other jobs' turns on the cores.
    ``epoch`` (``time.time()``) is when the run started, so that a worker process logs times on
    the main process's clock.
    """

    def __init__(self, log: Callable[[str], None], epoch: float | None = None, prefix: str = ""):
        self._log = log
        self.epoch = time.time() if epoch is None else epoch
        self._prefix = prefix
        self._cpu_started = time.process_time()
        self._load_start = os.getloadavg()
        self.stages: list[dict[str, float | str]] = []
        self.before_stage: Callable[[], None] | None = None  # e.g. stop if another process failed

    def log(self, text: str) -> None:
        self._log(f"[{time.time() - self.epoch:6.0f} s] {self._prefix}{text}")

    @contextmanager
    def stage(self, name: str, text: str | None = None) -> Iterator[None]:
        if self.before_stage is not None:
            self.before_stage()
        self.log(text or name)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.stages.append({"stage": name, "wall_s": round(time.perf_counter() - wall, 2),
                            "cpu_s": round(time.process_time() - cpu, 2)})

    def totals(self) -> dict:
        """This process's stages and CPU seconds so far (all of it: a worker counts its start too)."""
        return {"stages": self.stages, "cpu_s": round(time.process_time(), 2)}

    def finish(self, path: Path, worker: dict | None = None) -> None:
        """Log the table of stages (both processes') and write it, with the totals and the machine's
        load, to ``path``. Total wall time is this process's; total CPU time both processes'."""
        rows = [{**row, "process": "main"} for row in self.stages]
        own_cpu = time.process_time() - self._cpu_started
        total = {"wall_s": round(time.time() - self.epoch, 2), "cpu_s": round(own_cpu, 2),
                 "cpu_main_s": round(own_cpu, 2), "cpu_worker_s": 0.0, "processes": 1}
        if worker is not None:
            rows += [{**row, "process": "worker"} for row in worker["stages"]]
            total.update(cpu_s=round(own_cpu + worker["cpu_s"], 2), cpu_worker_s=worker["cpu_s"], processes=2)
            rows.sort(key=lambda row: row["stage"] == "report")  # the report comes last, after both
        width = max(len(str(row["stage"])) for row in rows)
        self._log(f"{'stage':<{width}}  {'process':<7}  {'wall s':>7}  {'cpu s':>7}")
        for row in [*rows, {"stage": "total", "process": "both" if worker else "main", **total}]:
            self._log(f"{row['stage']:<{width}}  {row['process']:<7}  {row['wall_s']:>7.1f}  {row['cpu_s']:>7.1f}")
        if worker is not None:
            self._log(f"(CPU: main process {total['cpu_main_s']:.1f} s, worker process {total['cpu_worker_s']:.1f} s; "
                      f"wall: from start to report)")
        path.write_text(json.dumps({"stages": rows, "total": total, "cpus": os.cpu_count(),
                                    "torch_threads": torch.get_num_threads(),
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
        f"Probes are 5-fold by puzzle with bootstrap 95% intervals over puzzles. Faithfulness samples "
        f"{config.n_model} held-out puzzles, paraphrase {config.n_paraphrase} (three runs of each), the causal check "
        f"{config.n_causal} fresh ones (once per condition), and the twin's and the sampler controls' datasets hold "
        f"{config.n_compare} (compare reads as many rows from every run): fewer than the datasets' to keep the demo within two "
        f"minutes, enough for intervals far narrower than the effects they measure (see each summary)."
    )
