"""Linear probes: multinomial logistic regression with L2, fitted by full-batch L-BFGS in torch.

:func:`fit_logistic` fits many independent probes at once: every probe runs its own L-BFGS
(history, step, stopping test) while probes on the same rows share each matrix product. The
objective per probe is scikit-learn's ``LogisticRegression(C=C)``:
``C * sum_i CE(x_i, y_i) + ||W||^2 / 2`` (the intercept is not penalised), divided by ``C * n`` so
that probes of different sizes are on one scale (as scikit-learn's lbfgs solver divides it too).
With two classes the objective stays multinomial (one weight vector per class): scikit-learn fits
a single vector there, and the two match at twice the C (the penalty on ``w1 - w0`` is halved).

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
    history: int = 10,
    report: dict | None = None,
) -> tuple[Float[Tensor, "cell problem d cls"], Float[Tensor, "cell problem cls"]]:
    """Fit L2 logistic regressions on standardised features, many at once.

    Every cell holds rows of features ``X`` shared by its problems; a problem is a set of labels
    ``y`` and of training rows (``weight`` 1; 0 for test rows and padding), e.g. one per fold and
    label set. Each problem standardises with its own training rows, as a StandardScaler fitted
    per fold would. Problems of a cell share one matrix product, which is what makes a grid fast.

    The optimiser is L-BFGS run separately for every problem (its own history, step and stopping
    test), batched: a problem stops when the largest absolute entry of its gradient falls below
    ``tol``, scikit-learn's stopping test for ``solver="lbfgs"`` on the same objective divided by
    the training rows; a cell whose problems have all stopped costs nothing more. The L-BFGS start
    matrix is the inverse of ``(Corr / n_classes + lambda I)``, ``Corr`` the cell's feature
    correlation matrix: the objective's Hessian at zero, so that correlated features (a residual
    stream's are) do not slow the fit down. ``max_iter`` caps the iterations (as scikit-learn's).

    ``report``, if given, receives ``iterations``, ``cell_evaluations`` (objective and gradient
    evaluations, counted per cell) and, per (cell, problem), ``grad_max`` (the final largest
    absolute gradient entry) and ``converged`` (``grad_max <= tol``).

    Returns ``W`` and ``b`` in the raw feature space: ``logits = X @ W[c, p] + b[c, p]``.
    """
    batch = _Batch(X, y, weight, n_classes, C)
    theta, grad_max, iterations = _lbfgs(batch, max_iter, tol, history)
    if report is not None:
        report.update(iterations=iterations, cell_evaluations=batch.evaluations, grad_max=grad_max,
                      converged=grad_max <= tol)
    return batch.raw(theta)


class _Batch:
    """The objective of every (cell, problem), its gradient and a preconditioner, in standardised
    coordinates: ``theta[c, p, k]`` is class k's weights on the problem's standardised features
    followed by its intercept; the objective is ``mean CE + ||weights||^2 / (2 C n)``."""

    def __init__(self, X: Tensor, y: Tensor, weight: Tensor, n_classes: int, C: float):
        self.cells, _, self.d = X.shape
        self.problems, self.K = y.shape[1], n_classes
        self.dtype, self.device = X.dtype, X.device
        weight = weight.to(self.dtype)
        d, K = self.d, self.K
        n = weight.sum(dim=2).clamp_min(1.0)  # (cell, problem): training rows
        self.lam = 1.0 / (C * n)  # sklearn's C, per training row
        self.x, self.xT, self.onehot, self.row_weight = [], [], [], []
        centre, means, scales, corr = [], [], [], []
        for c in range(self.cells):
            # Only the rows some problem trains on matter; centring them once keeps float32 accurate.
            used = (weight[c] > 0).any(dim=0).nonzero().squeeze(1)
            x = X[c].index_select(0, used)
            m = x.sum(0) / max(len(used), 1)
            x = x - m
            w = weight[c].index_select(1, used)  # (problem, row)
            mean = (w @ x) / n[c].unsqueeze(1)  # each problem's StandardScaler, on its training rows
            var = (w @ x.square()) / n[c].unsqueeze(1) - mean.square()
            scale = var.clamp_min(0).sqrt()
            scales.append(torch.where(scale > 1e-6, scale, torch.ones_like(scale)))  # constant features stay
            means.append(mean)
            centre.append(m)
            z = x / (x.square().sum(0).clamp_min(1e-12).sqrt())
            corr.append(z.T @ z)  # correlation matrix of the cell's rows
            rw = w / n[c].unsqueeze(1)
            onehot = torch.zeros((K, self.problems, len(used)), dtype=self.dtype, device=self.device)
            onehot.scatter_(0, y[c].index_select(1, used).unsqueeze(0), 1.0)
            self.x.append(x)
            self.xT.append(x.T.contiguous())
            self.row_weight.append(rw)
            self.onehot.append(onehot * rw)  # the label term of CE and of its gradient, weighted
        self.mean, self.scale = torch.stack(means), torch.stack(scales)  # (cell, problem, d)
        self.centre = torch.stack(centre)  # (cell, d)
        eigenvalues, self.Q = torch.linalg.eigh(torch.stack(corr).double())
        self.Q = self.Q.to(self.dtype)
        curvature = 1.0 / K  # the CE Hessian at zero is Corr (x) (I - 1 1^T / K) / K
        self.bias_curvature = curvature
        self.denominator = (curvature * eigenvalues.clamp_min(0).to(self.dtype).view(self.cells, 1, 1, d)
                            + self.lam.view(self.cells, self.problems, 1, 1))
        self.evaluations = 0

    def weights(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Raw-space weights (cell, problem, cls, d) and intercepts of centred rows."""
        W = theta[..., : self.d] / self.scale.unsqueeze(2)
        return W, theta[..., self.d] - (W * self.mean.unsqueeze(2)).sum(-1)

    def raw(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        W, b = self.weights(theta)
        b = b - (W * self.centre.view(self.cells, 1, 1, self.d)).sum(-1)
        return W.transpose(2, 3).contiguous(), b

    def evaluate(self, theta: Tensor, need: Tensor) -> tuple[Tensor, Tensor]:
        """Objective (cell, problem) and gradient at ``theta`` of the problems marked in ``need``
        (cell, problem); the others' entries are meaningless. Only the marked problems' columns of a
        cell's matrix products are computed, and cells without one are skipped."""
        P, K, d = self.problems, self.K, self.d
        f = torch.zeros((self.cells, P), dtype=self.dtype, device=self.device)
        grad = torch.zeros_like(theta)
        W, b = self.weights(theta)
        Wk = W.transpose(1, 2)  # (cell, cls, problem, d)
        counts = need.sum(1).tolist()
        for c, count in enumerate(counts):
            if count == 0:
                continue
            self.evaluations += 1
            if count == P:
                which, Wc, bc, onehot, rw = slice(None), Wk[c], b[c], self.onehot[c], self.row_weight[c]
            else:
                which = need[c].nonzero().squeeze(1)
                Wc, bc = Wk[c].index_select(1, which), b[c].index_select(0, which)
                onehot, rw = self.onehot[c].index_select(1, which), self.row_weight[c].index_select(0, which)
            logits = torch.mm(Wc.reshape(K * count, d), self.xT[c]).view(K, count, self.x[c].shape[0])
            logits += bc.T.unsqueeze(-1)
            top = logits.amax(0)
            e = (logits - top).exp_()
            total = e.sum(0)
            lse = total.log().add_(top)  # (problem, row)
            f[c, which] = (lse * rw).sum(-1) - (logits * onehot).sum((0, 2))
            G = e.mul_((rw / total).unsqueeze(0)).sub_(onehot)  # d(mean CE) / d logits
            gb = G.sum(-1).T  # (problem, cls)
            gW = torch.mm(G.view(K * count, self.x[c].shape[0]), self.x[c]).view(K, count, d).transpose(0, 1)
            grad[c, which, :, :d] = gW - gb.unsqueeze(-1) * self.mean[c, which].unsqueeze(1)
            grad[c, which, :, d] = gb
        V = theta[..., :d]
        f += 0.5 * self.lam * V.square().sum((2, 3))
        grad[..., :d] /= self.scale.unsqueeze(2)
        grad[..., :d] += self.lam.view(self.cells, P, 1, 1) * V
        return f, grad

    def precondition(self, g: Tensor) -> Tensor:
        """``(Corr / K + lambda I)^-1`` on the weights, ``K`` on the intercepts."""
        cells, P, K, d = self.cells, self.problems, self.K, self.d
        z = torch.bmm(g[..., :d].reshape(cells, P * K, d), self.Q).view(cells, P, K, d) / self.denominator
        out = torch.empty_like(g)
        out[..., :d] = torch.bmm(z.view(cells, P * K, d), self.Q.transpose(1, 2)).view(cells, P, K, d)
        out[..., d] = g[..., d] / self.bias_curvature
        return out


def _lbfgs(batch: _Batch, max_iter: int, tol: float, history: int) -> tuple[Tensor, Tensor, int]:
    """Preconditioned L-BFGS with a backtracking (Armijo) line search, every problem on its own."""
    cells, P = batch.cells, batch.problems
    theta = torch.zeros((cells, P, batch.K, batch.d + 1), dtype=batch.dtype, device=batch.device)
    f, g = batch.evaluate(theta, torch.ones((cells, P), dtype=torch.bool, device=batch.device))

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum((2, 3))

    def per_problem(v: Tensor) -> Tensor:
        return v.view(cells, P, 1, 1)

    S: list[Tensor] = []
    Y: list[Tensor] = []
    rho: list[Tensor] = []
    active = torch.ones((cells, P), dtype=torch.bool, device=batch.device)
    iterations = 0
    for iterations in range(max_iter + 1):
        active &= g.abs().amax((2, 3)) > tol
        if iterations == max_iter or not active.any():
            break
        # Two-loop recursion: direction = -H g, H the L-BFGS inverse Hessian from the start matrix.
        q = g.clone()
        alphas = []
        for s, yy, r in zip(reversed(S), reversed(Y), reversed(rho)):
            a = r * dot(s, q)
            q -= per_problem(a) * yy
            alphas.append(a)
        if S:
            gamma = torch.where(rho[-1] > 0, 1.0 / (rho[-1] * dot(Y[-1], batch.precondition(Y[-1]))), 1.0)
        else:
            gamma = torch.ones((cells, P), dtype=batch.dtype, device=batch.device)
        z = per_problem(gamma) * batch.precondition(q)
        for s, yy, r, a in zip(S, Y, rho, reversed(alphas)):
            z += per_problem(a - r * dot(yy, z)) * s
        direction = -z * per_problem(active)
        slope = dot(g, direction)
        uphill = active & (slope >= 0)
        if uphill.any():  # numerically lost: restart from the preconditioned gradient
            direction = torch.where(per_problem(uphill), -batch.precondition(g) * per_problem(active), direction)
            slope = dot(g, direction)
        # Backtracking line search per problem, evaluating only the problems still searching.
        step = torch.ones((cells, P), dtype=batch.dtype, device=batch.device)
        searching = active.clone()
        new_theta, new_f, new_g = theta.clone(), f.clone(), g.clone()
        for _ in range(20):
            trial = theta + per_problem(step * searching) * direction
            f_trial, g_trial = batch.evaluate(trial, searching)
            accept = searching & (f_trial <= f + 1e-4 * step * slope)
            new_theta = torch.where(per_problem(accept), trial, new_theta)
            new_f = torch.where(accept, f_trial, new_f)
            new_g = torch.where(per_problem(accept), g_trial, new_g)
            searching &= ~accept
            if not searching.any():
                break
            step = torch.where(searching, step * 0.5, step)
        active &= ~searching  # no decrease found: the problem is as converged as float precision allows
        s, yy = new_theta - theta, new_g - g
        sy = dot(s, yy)
        S.append(s)
        Y.append(yy)
        rho.append(torch.where(sy > 1e-12, 1.0 / sy.clamp_min(1e-12), 0.0))  # 0: the pair is skipped
        if len(S) > history:
            del S[0], Y[0], rho[0]
        theta, f, g = new_theta, new_f, new_g
    return theta, g.abs().amax((2, 3)), iterations


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
