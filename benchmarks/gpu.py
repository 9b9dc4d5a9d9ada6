"""Every GPU figure of the project in one call of at most ~5 minutes, written to one JSON.

    python benchmarks/gpu.py [--json benchmarks/results-gpu.json] [--budget 290]
    python benchmarks/gpu.py --shape tiny --json /tmp/gpu-tiny.json     # the same code paths, on the CPU

Three sections, each bounded by what is left of ``--budget`` seconds (a section that runs out is
recorded as timed out and the next one still runs):

1. ``llada``: capture overhead at LLaDA-8B shape with random weights in bfloat16 (32 layers, d_model
   4096, canvas 256, 64 denoising steps, 4 residual-stream sites, the answer slots: the last 32
   target positions; goal <= 1.15x). The model is ``tests/remote_code/tiny_llada.py`` (the real
   LLaDA module tree) built from a big config; it is recorded by module path through the nnsight
   backend and written with :class:`ActivationWriter`, as a Hugging Face model is. Plain sampling
   and sampling + recording + writing are alternated, ``repeats`` times each after a warm-up.
2. ``probe_grid``: ``benchmarks/probe_grid.py --device cuda`` (batched probes on the GPU against the
   scikit-learn loop on the CPU).
3. ``capture``: ``benchmarks/capture_overhead.py --device cuda`` on each shipped diffusion model.

Without a GPU (and without ``--shape tiny``) it says so and exits 0. ``--shape tiny`` runs every
section at a tiny size on the CPU, so the script is known to work before a GPU minute is spent.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dlmprobe.hooks import ActivationRecorder
from dlmprobe.sampling import DiffusionSamplerConfig
from dlmprobe.sampling.sampler import make_canvas, sample
from dlmprobe.store import ActivationWriter, StoreLayout

HERE = Path(__file__).resolve().parent
TINY_LLADA = HERE.parent / "tests" / "remote_code" / "tiny_llada.py"
LLADA_GOAL = 1.15
SHAPES: dict[str, dict[str, Any]] = {
    "full": {
        "device": "cuda",
        "llada": {"d_model": 4096, "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288,
                  "vocab_size": 126464, "mask_token_id": 126336, "max_sequence_length": 4096},
        "canvas": 256, "target": 128, "steps": 64, "answer_slots": 32, "layers": [7, 15, 23, 31],
        "batch_size": 8, "batches": 2, "repeats": 3,
        "probe_grid": ["--device", "cuda"],
        "capture": ["--device", "cuda", "--n", "256", "--repeats", "3"],
        "capture_models": ["sudoku-diffusion", "arith-diffusion", "pathstar-diffusion"],
    },
    "tiny": {
        "device": "cpu",
        "llada": {"d_model": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 4, "mlp_hidden_size": 64,
                  "vocab_size": 64, "mask_token_id": 63, "max_sequence_length": 64},
        "canvas": 32, "target": 16, "steps": 8, "answer_slots": 4, "layers": [0, 1, 2, 3],
        "batch_size": 2, "batches": 2, "repeats": 1,
        # arith: 4 denoising steps, the shortest shipped run.
        "probe_grid": ["--device", "cpu", "--model", "arith-diffusion", "--n", "64", "--steps", "0", "--repeats", "1"],
        "capture": ["--device", "cpu", "--quick"],
        "capture_models": ["arith-diffusion"],
    },
}
# Seconds kept back for the sections after the one running, so that each gets a turn.
RESERVE = {"llada": 150, "probe_grid": 70, "capture": 0}


def llada_module():
    """``tests/remote_code/tiny_llada.py``, imported by path."""
    spec = importlib.util.spec_from_file_location("dlmprobe_bench_tiny_llada", TINY_LLADA)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # transformers resolves the classes' annotations through it
    spec.loader.exec_module(module)
    return module


def build_llada(shape: dict[str, Any], device: str) -> torch.nn.Module:
    """A LLaDA-shaped model with random weights, made in bfloat16 directly on ``device``."""
    module = llada_module()
    config = module.LLaDAConfig(**shape["llada"])
    default = torch.get_default_dtype()
    torch.manual_seed(0)
    try:
        torch.set_default_dtype(torch.bfloat16)  # never a float32 copy of 8B weights
        with torch.device(device):
            model = module.LLaDAModelLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class LladaRun:
    """Batches of random prompts sampled by the LLaDA-shaped model, plain or recorded and written."""

    def __init__(self, shape: dict[str, Any], device: str, folder: Path):
        self.shape, self.device, self.folder = shape, device, folder
        self.model = build_llada(shape, device)
        config = shape["llada"]
        self.mask_id = config["mask_token_id"]
        self.target = shape["target"]
        self.prompt = shape["canvas"] - self.target - 3  # <bos> prompt <sep> target <eos>
        generator = torch.Generator().manual_seed(0)
        n = shape["batch_size"] * shape["batches"]
        # Prompt tokens are anything but the mask; ids 0 and 1 stand for <bos> and <sep>/<eos>.
        self.prefix = torch.cat([torch.zeros(n, 1, dtype=torch.long),
                                 torch.randint(2, self.mask_id, (n, self.prompt), generator=generator),
                                 torch.ones(n, 1, dtype=torch.long)], dim=1)
        self.sampler = DiffusionSamplerConfig(steps=shape["steps"])
        self.gen_start = self.prompt + 2
        # The answer slots: the last positions of the target, where an answer is written.
        self.positions = list(range(self.gen_start + self.target - shape["answer_slots"], self.gen_start + self.target))
        self.sites = {f"blocks.{i}.hook_resid_post": f"model.transformer.blocks.{i}" for i in shape["layers"]}
        self.layout = StoreLayout(n_examples=n, n_steps=shape["steps"], canvas_length=shape["canvas"],
                                  prompt_length=self.prompt, target_length=self.target,
                                  labels={"answer": shape["answer_slots"]},
                                  sites=dict.fromkeys(self.sites, config["d_model"]), steps=range(shape["steps"]),
                                  positions=self.positions, dtype="float16")

    def batches(self):
        size = self.shape["batch_size"]
        for start in range(0, len(self.prefix), size):
            prefix = self.prefix[start : start + size]
            yield start, make_canvas(prefix, self.target, self.mask_id, torch.ones(len(prefix), 1, dtype=torch.long))

    def plain(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        for _, canvas in self.batches():
            sample(self.model, canvas, self.gen_start, self.target, self.mask_id, self.sampler)
        synchronize(self.device)
        return time.perf_counter() - start

    def capture(self) -> float:
        """Sample every batch recording the sites, and write each batch to a fresh HDF5 store."""
        out = self.folder / "llada.h5"
        recorder = ActivationRecorder(self.model, self.sites, backend="nnsight", positions=self.positions,
                                      dtype=torch.float16)
        answer = torch.tensor(self.positions) - self.gen_start
        synchronize(self.device)
        start = time.perf_counter()
        with ActivationWriter(out, self.layout, config={"benchmark": "llada"}, mask_id=self.mask_id) as writer:
            for first, canvas in self.batches():
                with recorder:
                    run = sample(recorder.model, canvas, self.gen_start, self.target, self.mask_id, self.sampler,
                                 rows=torch.arange(first, first + len(canvas)), observers=[recorder])
                    activations = recorder.pop().activations
                rows = len(canvas)
                writer.write_batch({
                    "uid": [f"llada-{first + i}" for i in range(rows)],
                    "prompt": canvas[:, 1 : 1 + self.prompt].numpy(), "target": run.output.numpy(),
                    "output": run.output.numpy(), "solved": torch.zeros(rows, dtype=torch.bool).numpy(),
                    "canvas": run.canvases.numpy(), "commit_step": run.commit_step.numpy(),
                    "prediction": run.predictions.numpy(), "confidence": run.confidence.numpy(),
                    "labels": {"answer": (answer.expand(rows, -1).numpy(), run.output[:, answer].numpy())},
                    "activations": {site: value.numpy() for site, value in activations.items()},
                }, copy=False)
        elapsed = time.perf_counter() - start
        out.unlink()
        return elapsed


def llada_section(shape: dict[str, Any], device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="dlmprobe-gpu-") as tmp:
        started = time.perf_counter()
        run = LladaRun(shape, device, Path(tmp))
        built_s = time.perf_counter() - started
        run.plain()  # warm-up of both paths: kernels, nnsight, HDF5
        run.capture()
        plain_s, capture_s = [], []
        for repeat in range(shape["repeats"]):
            first, second = (run.plain, run.capture) if repeat % 2 == 0 else (run.capture, run.plain)
            a, b = first(), second()
            plain_s.append(a if first == run.plain else b)
            capture_s.append(b if first == run.plain else a)
            print(f"llada repeat {repeat + 1}/{shape['repeats']}: plain {plain_s[-1]:.2f} s, capture {capture_s[-1]:.2f} s",
                  flush=True)
        n_params = sum(p.numel() for p in run.model.parameters())
        stored = run.layout.bytes_needed()
        del run
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "shape": {k: shape[k] for k in ("canvas", "target", "steps", "answer_slots", "layers", "batch_size",
                                        "batches", "repeats")} | {"llada": shape["llada"]},
        "parameters": n_params, "dtype": "bfloat16", "stored_dtype": "float16", "store_bytes": stored,
        "build_s": round(built_s, 2), "plain_s": plain_s, "capture_s": capture_s,
        "ratio_median": statistics.median(c / p for c, p in zip(capture_s, plain_s)), "goal": LLADA_GOAL,
    }


def script_section(command: list[str], timeout: float) -> dict[str, Any]:
    """Run a benchmark script that writes ``--json``; its results, or how it failed."""
    with tempfile.TemporaryDirectory(prefix="dlmprobe-gpu-") as tmp:
        out = Path(tmp) / "result.json"
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, *command, "--json", str(out)], timeout=max(timeout, 1),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired:
            return {"status": f"timed out after {timeout:.0f} s", "command": command}
        elapsed = round(time.perf_counter() - start, 1)
        if done.returncode != 0 or not out.exists():
            return {"status": f"failed with exit code {done.returncode}", "command": command, "seconds": elapsed,
                    "output_tail": done.stdout[-2000:]}
        return {"status": "ok", "command": command, "seconds": elapsed, "result": json.loads(out.read_text())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="full")
    parser.add_argument("--budget", type=float, default=290, help="seconds for the whole script (default 290)")
    parser.add_argument("--json", type=Path, default=HERE / "results-gpu.json", help="where the results go")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    device = shape["device"]
    if device == "cuda" and not torch.cuda.is_available():
        print("no GPU here (torch.cuda.is_available() is False): nothing to measure; "
              "--shape tiny runs the same code on the CPU")
        return 0
    deadline = time.perf_counter() + args.budget
    results: dict[str, Any] = {
        "shape": args.shape, "device": device, "torch": torch.__version__, "cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }

    def left(section: str) -> float:
        return deadline - time.perf_counter() - RESERVE[section]

    start = time.perf_counter()
    try:
        results["llada"] = {"status": "ok", **llada_section(shape, device)}
    except Exception as err:  # noqa: BLE001 -- one section failing must not cost the others' numbers
        results["llada"] = {"status": f"failed: {type(err).__name__}: {err}"}
    results["llada"]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"llada: {results['llada'].get('ratio_median', results['llada']['status'])}", flush=True)

    results["probe_grid"] = script_section([str(HERE / "probe_grid.py"), *shape["probe_grid"]], left("probe_grid"))
    print(f"probe_grid: {results['probe_grid']['status']}", flush=True)

    results["capture"] = {}
    for model in shape["capture_models"]:
        section = script_section([str(HERE / "capture_overhead.py"), "--model", model, "--skip-memory",
                                  *shape["capture"]], left("capture"))
        results["capture"][model] = section
        print(f"capture {model}: {section['status']}", flush=True)
    results["seconds"] = round(time.perf_counter() - start, 1)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json} after {results['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
