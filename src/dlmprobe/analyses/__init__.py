"""Analyses that turn activation datasets, probes and models into answers to the questions in the README.

Each returns an :class:`AnalysisResult`: a tidy table, a figure and a summary computed from the table.

1. :func:`decodability` — probe accuracy over steps and committed fraction, per layer.
2. :func:`planning_lead` — how many steps before its commit a token is known (probe, argmax).
3. :func:`compare_runs` — diffusion vs autoregressive twin vs left-to-right diffusion.
4. :func:`commit_order` — answer vs reasoning commit times; sudoku easy-first.
5. :func:`faithfulness` — corrupt or remask committed reasoning at step t; does the answer follow?
6. :func:`paraphrase_run` — meaning-preserving rewrites of the canvas after every step.
7. :func:`causal_check` — ablate or steer the probe subspace during sampling.
8. :func:`trajectory_view` — one example, token x step.
9. :func:`seed_spread` — the step-0 headline numbers over several training seeds of one model.
"""

from dlmprobe.analyses.causal import causal_check
from dlmprobe.analyses.compare import compare_runs
from dlmprobe.analyses.decodability import decodability
from dlmprobe.analyses.faithfulness import faithfulness
from dlmprobe.analyses.lead import planning_lead
from dlmprobe.analyses.order import commit_order
from dlmprobe.analyses.paraphrase import paraphrase_run
from dlmprobe.analyses.result import AnalysisResult, load_result
from dlmprobe.analyses.seeds import seed_spread
from dlmprobe.analyses.trajectory import trajectory_view

__all__ = [
    "AnalysisResult",
    "causal_check",
    "commit_order",
    "compare_runs",
    "decodability",
    "faithfulness",
    "load_result",
    "paraphrase_run",
    "planning_lead",
    "seed_spread",
    "trajectory_view",
]
