"""Every shipped checkpoint still solves its task as well as the model card says.

Re-measured on a fresh sample of held-out puzzles (a different seed from the card's).
"""

import json
import math

import pytest

from dlmprobe.models import CHECKPOINT_DIR, load_model, shipped_checkpoints
from dlmprobe.sampling import evaluate
from dlmprobe.training import plateau_verdict, read_curve

CARD = CHECKPOINT_DIR / "model_card.json"
CARDS = json.loads(CARD.read_text()) if CARD.exists() else []
TOLERANCE = 0.03
N_FRESH = 1000


def test_every_shipped_checkpoint_is_on_the_card():
    assert shipped_checkpoints(), "no shipped checkpoints"
    assert sorted(c["name"] for c in CARDS) == shipped_checkpoints()


def test_checkpoints_fit_the_size_budget():
    total = sum(p.stat().st_size for p in CHECKPOINT_DIR.glob("*/model.safetensors"))
    assert total < 30e6, f"shipped checkpoints take {total / 1e6:.1f} MB"


@pytest.mark.parametrize("name", shipped_checkpoints())
def test_every_shipped_model_was_trained_to_its_plateau(name):
    """The card's rule: held-out exact-solve gained at most 2 points over the last 1000 training steps,
    or ended within 2 points of 100% (read from the checkpoint's own train_log.jsonl)."""
    curve = read_curve(CHECKPOINT_DIR / name)
    assert plateau_verdict(curve) in ("level", "at the ceiling"), (name, curve[-3:])


@pytest.mark.slow
@pytest.mark.parametrize("card", CARDS, ids=[c["name"] for c in CARDS])
def test_recorded_accuracy_reproduces(card):
    ckpt = load_model(card["name"])
    assert ckpt.weights_sha256 == card["weights_sha256"], "weights changed since the card was written"
    accuracy = evaluate(ckpt.model, ckpt.task, ckpt.kind, n=N_FRESH, seed=card["eval_seed"] + 1)
    # Two independent samples of one rate: allow 3 standard errors of their difference (at least TOLERANCE),
    # so a ~50% model measured on 1000 + 1000 puzzles is not failed by sampling noise alone.
    p = card["accuracy"]
    noise = 3 * math.sqrt(p * (1 - p) * (1 / card["n_eval"] + 1 / N_FRESH))
    assert abs(accuracy - p) <= max(TOLERANCE, noise), (accuracy, p, noise)


TARGETS = {"sudoku": 0.90, "pathstar": 0.95, "arith": 0.95}
# Known shortfalls, kept visible rather than hidden: task -> reason (see MODELS.md). A listed task is
# a strict xfail, so it fails loudly once its checkpoint meets the target. None at present.
SHORTFALLS: dict[str, str] = {}
N_TARGET = 200  # fresh held-out puzzles: enough to tell 90% from the card's 99.9%, in seconds


@pytest.mark.parametrize(
    "card",
    [pytest.param(c, id=c["name"], marks=pytest.mark.xfail(strict=True, reason=SHORTFALLS[c["task"]]))
     if c["task"] in SHORTFALLS else pytest.param(c, id=c["name"]) for c in CARDS if c["kind"] == "diffusion"],
)
def test_diffusion_models_meet_their_targets(card):
    """Measured, not read from the card: every shipped denoiser (every seed) samples fresh held-out puzzles."""
    ckpt = load_model(card["name"])
    accuracy = evaluate(ckpt.model, ckpt.task, ckpt.kind, n=N_TARGET, seed=card["eval_seed"] + 2)
    assert accuracy >= TARGETS[card["task"]], f"{card['name']} solves {accuracy:.1%} of {N_TARGET}, target {TARGETS[card['task']]:.0%}"
