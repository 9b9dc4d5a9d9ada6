"""Linear probes: multinomial logistic regression with L2, fitted by full-batch L-BFGS in torch.

:func:`fit_logistic` fits many independent probes ("cells") in one optimisation: their losses are
summed, and since no parameter is shared, the optimum of the sum is every cell's own optimum. The
objective per cell is scikit-learn's ``LogisticRegression(C=C)``:
``C * sum_i CE(x_i, y_i) + ||W||^2 / 2`` (the intercept is not penalised), divided by ``C * n`` so
that cells of different sizes are on one scale.

:class:`LinearProbe` is one such probe with the scikit-learn estimator contract, so it works in
pipelines, ``cross_val_score`` and ``GridSearchCV``; it saves as safetensors + JSON.

Example:
    >>> probe = LinearProbe(C=1.0).fit(X_train, y_train)
    >>> probe.score(X_test, y_test)
    >>> probe.save("probe")          # probe.safetensors + probe.json
    >>> LinearProbe.load("probe").predict(X_test)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor


def fit_logistic(
    X: Float[Tensor, "cell row d"],
    y: Int[Tensor, "cell row"],
    weight: Float[Tensor, "cell row"],
    n_classes: int,
    C: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-6,
) -> tuple[Float[Tensor, "cell d cls"], Float[Tensor, "cell cls"]]:
    """Fit one L2 logistic regression per cell, all cells at once.

    ``weight`` is 1 for a row of the cell's training set and 0 for padding (cells may differ in
    size). Features should be standardised. Returns weights ``W`` and intercepts ``b``.
    """
    cells, _, d = X.shape
    n = weight.sum(dim=1).clamp_min(1.0)  # training rows per cell
    row_weight = weight / n.unsqueeze(1)  # mean cross-entropy per cell
    l2 = 1.0 / (C * n)  # sklearn's C, per training row
    W = torch.zeros((cells, d, n_classes), dtype=X.dtype, device=X.device, requires_grad=True)
    b = torch.zeros((cells, n_classes), dtype=X.dtype, device=X.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tol, tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")
    flat_y = y.reshape(-1)

    def closure() -> Tensor:
        optimizer.zero_grad()
        logits = torch.baddbmm(b.unsqueeze(1), X, W)  # (cells, rows, classes)
        ce = F.cross_entropy(logits.reshape(-1, n_classes), flat_y, reduction="none").view_as(row_weight)
        loss = (ce * row_weight).sum() + 0.5 * (l2.view(-1, 1, 1) * W.square()).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return W.detach(), b.detach()


def standardize(X: Float[Tensor, "cell row d"], weight: Float[Tensor, "cell row"]) -> tuple[Tensor, Tensor]:
    """Per-cell mean and scale of the training rows (``weight`` 1), as sklearn's StandardScaler."""
    n = weight.sum(dim=1).clamp_min(1.0).view(-1, 1, 1)
    w = weight.unsqueeze(-1)
    mean = (X * w).sum(dim=1, keepdim=True) / n
    var = ((X - mean).square() * w).sum(dim=1, keepdim=True) / n
    scale = var.sqrt()
    scale = torch.where(scale > 1e-8, scale, torch.ones_like(scale))  # constant features stay as they are
    return mean, scale


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression with L2 (scikit-learn's ``C``), on standardised features.

    Attributes (after ``fit``): ``classes_``, ``coef_`` (n_classes, d) and ``intercept_`` in the
    original feature space, ``n_features_in_``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-6, device: str = "cpu"):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def fit(self, X, y) -> "LinearProbe":
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2)
        if not np.isfinite(X).all():
            raise ValueError("probe features contain NaN or inf")
        check_classification_targets(y)
        if self.C <= 0:
            raise ValueError(f"C must be positive, got {self.C!r}")
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"a probe needs at least 2 classes in y, got only {self.classes_.tolist()}")
        Xt = torch.as_tensor(X, dtype=torch.float32, device=self.device).unsqueeze(0)
        yt = torch.as_tensor(encoded, dtype=torch.long, device=self.device).unsqueeze(0)
        weight = torch.ones(yt.shape, dtype=torch.float32, device=self.device)
        mean, scale = standardize(Xt, weight)
        W, b = fit_logistic((Xt - mean) / scale, yt, weight, len(self.classes_), self.C, self.max_iter, self.tol)
        # Fold the standardisation into the weights, so coef_ applies to raw features.
        coef = (W[0] / scale[0, 0].unsqueeze(1)).T
        self.coef_ = coef.cpu().numpy().astype(np.float64)
        self.intercept_ = (b[0] - (mean[0, 0] @ (W[0] / scale[0, 0].unsqueeze(1)))).cpu().numpy().astype(np.float64)
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return X @ self.coef_.T + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        scores = scores - scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        return probs / probs.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (hyper-parameters, classes)."""
        check_is_fitted(self)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"coef": torch.from_numpy(self.coef_.copy()), "intercept": torch.from_numpy(self.intercept_.copy())},
                  str(path.with_suffix(".safetensors")))
        meta = {"params": self.get_params(), "classes": self.classes_.tolist(), "n_features_in": self.n_features_in_}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LinearProbe":
        path = Path(path)
        for suffix in (".json", ".safetensors"):
            if not path.with_suffix(suffix).is_file():
                raise FileNotFoundError(f"no probe at {path}: expected {path.with_suffix(suffix)}")
        meta = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
        probe = cls(**meta["params"])
        probe.classes_ = np.array(meta["classes"])
        probe.n_features_in_ = meta["n_features_in"]
        probe.coef_ = tensors["coef"].numpy()
        probe.intercept_ = tensors["intercept"].numpy()
        return probe
