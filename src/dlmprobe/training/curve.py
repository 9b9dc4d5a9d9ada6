"""Has a training run reached its plateau? Read from the held-out curve in ``train_log.jsonl``.

The rule the kit's model card uses: a run is level when its held-out exact-solve rate gained at most
``tolerance`` over its last ``span`` steps (last evaluation minus the one ``span`` steps before, on
the same held-out puzzles), or when its last evaluation is within ``tolerance`` of 100%.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

PLATEAU_SPAN = 1000
PLATEAU_TOLERANCE = 0.02


def read_curve(folder: str | Path) -> list[tuple[int, float]]:
    """(step, held-out exact-solve) for every evaluation in ``folder/train_log.jsonl``."""
    lines = (Path(folder) / "train_log.jsonl").read_text().splitlines()
    return [(int(r["step"]), float(r["eval_accuracy"])) for r in map(json.loads, lines) if "eval_accuracy" in r]


def recent_gain(curve: Iterable[tuple[int, float]], span: int = PLATEAU_SPAN) -> float | None:
    """Held-out accuracy gained over the last ``span`` steps; None when no evaluation sits ``span`` steps back."""
    by_step = {int(step): float(acc) for step, acc in curve}
    if not by_step:
        return None
    last = max(by_step)
    return None if last - span not in by_step else round(by_step[last] - by_step[last - span], 6)


def plateau_verdict(curve: Iterable[tuple[int, float]], span: int = PLATEAU_SPAN,
                    tolerance: float = PLATEAU_TOLERANCE) -> str:
    """"at the ceiling", "level", "still rising" or "too short to tell" (fewer than ``span`` steps evaluated)."""
    curve = sorted((int(s), float(a)) for s, a in curve)
    if curve and curve[-1][1] >= 1 - tolerance:
        return "at the ceiling"
    gain = recent_gain(curve, span)
    if gain is None:
        return "too short to tell"
    return "level" if gain <= tolerance + 1e-9 else "still rising"
