"""The clock confound: how well the same features decode the denoising step and the masked fraction.

A diffusion model's residual stream carries the denoising step (arXiv 2607.01774). A probe that
"decodes the plan" may be decoding the clock instead; comparing a grid with this table tells them
apart. For each site, rows are the probed positions at every stored step; the step index is
decoded by the same linear probe (k-fold by example), the fraction of the target still masked by
ridge regression (R², k-fold by example).

Example:
    >>> clock_table(data, label="answer")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from dlmprobe.errors import DlmprobeInputError
from dlmprobe.hooks import layer_of
from dlmprobe.probes.linear import fit_logistic, predict_logits
from dlmprobe.store import ActivationDataset


def clock_table(data: ActivationDataset, label: str, sites: Sequence[str] | None = None, folds: int = 5,
                C: float = 1.0, ridge: float = 1.0, seed: int = 0, max_examples: int = 64) -> pd.DataFrame:
    """One row per site: step-decoding accuracy (and its chance level) and masked-fraction R².

    Rows pool every stored step, so the first ``max_examples`` examples are enough and keep it fast.
    """
    if label not in data.label_names:
        raise DlmprobeInputError(f"unknown label {label!r}; the dataset has labels {data.label_names}")
    sites = list(sites) if sites is not None else data.sites
    slots, _ = data.label(label)
    n = min(data.n_examples, max_examples)
    slots = slots[:n]
    k = slots.shape[1]
    positions = data.target_start + slots
    position_index = data.position_index(positions)
    rows = np.arange(n)[:, None]
    target = slice(data.target_start, data.target_start + data.output.shape[1])
    if data.commit_rule == "settle":  # no mask token: a position is open until the step it settles
        canvas_steps = np.arange(data.canvas.shape[1])
        masked_fraction = (canvas_steps[None, :, None] <= data.commit_step[:n, None, target]).mean(axis=2)
    else:
        masked_fraction = (data.canvas[:n, :, target] == data.mask_id).mean(axis=2)  # (n, canvas steps)
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    records = []
    for site in sites:
        X = np.stack([data.activations(site, int(s))[:n][rows, position_index] for s in data.steps], axis=1)  # (n, S, k, d)
        if not np.isfinite(X).all():
            raise DlmprobeInputError(f"activations of {site} contain NaN or inf at the probed positions")
        d = X.shape[-1]
        X = X.reshape(-1, d)
        step_label = np.broadcast_to(np.arange(len(data.steps))[None, :, None], (n, len(data.steps), k)).reshape(-1)
        fraction = np.broadcast_to(masked_fraction[:, data.steps][:, :, None], (n, len(data.steps), k)).reshape(-1)
        fold = np.broadcast_to(fold_of[:, None, None], (n, len(data.steps), k)).reshape(-1)
        Xt = torch.as_tensor(X).unsqueeze(0)
        train = torch.as_tensor(fold[None, :] != np.arange(folds)[:, None], dtype=torch.float32).unsqueeze(0)
        y = torch.as_tensor(step_label, dtype=torch.long).expand(1, folds, -1)
        W, b = fit_logistic(Xt, y, train, len(data.steps), C)  # one problem per fold
        predicted = predict_logits(Xt, W, b).argmax(-1)[0].numpy()  # (folds, rows)
        hits = sum(int((predicted[f][fold == f] == step_label[fold == f]).sum()) for f in range(folds))
        residual, total = 0.0, 0.0
        for f in range(folds):
            # Ridge regression of the masked fraction on the features, standardised on the training rows.
            tr, te = fold != f, fold == f
            mean, scale = X[tr].mean(0), X[tr].std(0) + 1e-6
            Ztr, Zte = torch.as_tensor((X[tr] - mean) / scale).double(), torch.as_tensor((X[te] - mean) / scale).double()
            target_tr = torch.as_tensor(fraction[tr])
            offset = target_tr.mean()
            coef = torch.linalg.solve(Ztr.T @ Ztr + ridge * torch.eye(d, dtype=torch.float64), Ztr.T @ (target_tr - offset))
            pred = (Zte @ coef + offset).numpy()
            residual += float(((fraction[te] - pred) ** 2).sum())
            total += float(((fraction[te] - fraction[tr].mean()) ** 2).sum())
        records.append({
            "site": site, "layer": layer_of(site), "label": label, "n_rows": len(step_label),
            "step_accuracy": hits / len(step_label), "step_chance": 1 / len(data.steps),
            "masked_fraction_r2": 1 - residual / total if total > 0 else float("nan"),
        })
    return pd.DataFrame(records)
