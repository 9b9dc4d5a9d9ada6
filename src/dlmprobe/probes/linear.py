"""Linear probes: multinomial logistic regression with L2, fitted by full-batch L-BFGS in torch.

:func:`fit_logistic` fits many independent probes in one optimisation: their losses are summed,
and since no parameter is shared, the optimum of the sum is every probe's own optimum. The
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
    y: Int[Tensor, "cell problem row"],
    weight: Float[Tensor, "cell problem row"],
    n_classes: int,
    C: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-4,
) -> tuple[Float[Tensor, "cell problem d cls"], Float[Tensor, "cell problem cls"]]:
    """Fit L2 logistic regressions on standardised features, many at once.

    Every cell holds rows of features ``X`` shared by its problems; a problem is a set of labels
    ``y`` and of training rows (``weight`` 1; 0 for test rows and padding), e.g. one per fold and
    label set. Each problem standardises with its own training rows, as a StandardScaler fitted
    per fold would. Problems of a cell share one matrix product, which is what makes a grid fast.

    Returns ``W`` and ``b`` in the raw feature space: ``logits = X @ W[c, p] + b[c, p]``.
    """
    cells, rows, d = X.shape
    problems = y.shape[1]
    n = weight.sum(dim=2).clamp_min(1.0)  # (cell, problem): training rows
    # Standardisation statistics of each problem's training rows.
    mean = torch.einsum("cpr,crd->cpd", weight, X) / n.unsqueeze(-1)
    var = torch.einsum("cpr,crd->cpd", weight, X.square()) / n.unsqueeze(-1) - mean.square()
    scale = var.clamp_min(0).sqrt()
    scale = torch.where(scale > 1e-6, scale, torch.ones_like(scale))  # constant features stay as they are
    row_weight = (weight / n.unsqueeze(-1)).transpose(1, 2)  # (cell, row, problem): mean CE per problem
    flat_y = y.transpose(1, 2).reshape(-1)
    l2 = (1.0 / (C * n)).view(cells, problems, 1, 1)  # sklearn's C, per training row
    V = torch.zeros((cells, problems, d, n_classes), dtype=X.dtype, device=X.device, requires_grad=True)
    b = torch.zeros((cells, problems, n_classes), dtype=X.dtype, device=X.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([V, b], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=tol, tolerance_change=tol * 1e-4, line_search_fn="strong_wolfe")

    def raw(V: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        W = V / scale.unsqueeze(-1)
        return W, b - torch.einsum("cpd,cpdk->cpk", mean, W)

    def closure() -> Tensor:
        optimizer.zero_grad()
        W, bias = raw(V, b)
        logits = torch.bmm(X, W.permute(0, 2, 1, 3).reshape(cells, d, problems * n_classes))
        logits = logits.view(cells, rows, problems, n_classes) + bias.unsqueeze(1)
        ce = F.cross_entropy(logits.reshape(-1, n_classes), flat_y, reduction="none").view_as(row_weight)
        loss = (ce * row_weight).sum() + 0.5 * (l2 * V.square()).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return raw(V, b)


def predict_logits(X: Float[Tensor, "cell row d"], W: Float[Tensor, "cell problem d cls"],
                   b: Float[Tensor, "cell problem cls"]) -> Float[Tensor, "cell problem row cls"]:
    """Logits of every problem's probe for every row of its cell."""
    return torch.einsum("crd,cpdk->cprk", X, W) + b.unsqueeze(2)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression with L2 (scikit-learn's ``C``), on standardised features.

    Attributes (after ``fit``): ``classes_``, ``coef_`` (n_classes, d) and ``intercept_`` in the
    original feature space, ``n_features_in_``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-4, device: str = "cpu"):
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
        yt = torch.as_tensor(encoded, dtype=torch.long, device=self.device).view(1, 1, -1)
        weight = torch.ones(yt.shape, dtype=torch.float32, device=self.device)
        W, b = fit_logistic(Xt, yt, weight, len(self.classes_), self.C, self.max_iter, self.tol)
        self.coef_ = W[0, 0].T.cpu().numpy().astype(np.float64)
        self.intercept_ = b[0, 0].cpu().numpy().astype(np.float64)
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
