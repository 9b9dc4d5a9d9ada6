"""Linear probes: multinomial logistic regression with L2, fitted by full-batch L-BFGS in torch.

:func:`fit_logistic` fits many independent probes at once: every probe runs its own L-BFGS
(history, step, stopping test) while probes on the same rows share each matrix product. The
objective per probe is scikit-learn's ``LogisticRegression(C=C)``:
``C * sum_i CE(x_i, y_i) + ||W||^2 / 2`` (the intercept is not penalised), divided by ``C * n`` so
that probes of different sizes are on one scale (as scikit-learn's lbfgs solver divides it too).
With two classes the objective stays multinomial (one weight vector per class) while scikit-learn
fits the single vector ``w = w1 - w0``; at the optimum ``w0 = -w1``, so the penalty
``||w0||^2 + ||w1||^2`` is ``||w||^2 / 2``, and fitting with ``C / 2`` makes the two the same
problem: ``C`` is scikit-learn's for any number of classes.

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
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from dlmprobe.errors import DlmprobeInputError

LOG2E, LN2 = math.log2(math.e), math.log(2.0)


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
    stream's are) do not slow the fit down; its curvature is measured again once the fit is under
    way. ``max_iter`` caps each problem's iterations (as scikit-learn's).

    ``report``, if given, receives ``cell_evaluations`` (objective and gradient evaluations, counted
    per cell), ``products`` (how many float matrix products of each shape the fit computed: a
    ``(batch, m, k, n)`` key, batch 1 for a plain product) and, per (cell, problem),
    ``iterations``, ``grad_max`` (the final largest absolute gradient entry) and ``converged``
    (``grad_max <= tol``).

    Returns ``W`` and ``b`` in the raw feature space: ``logits = X @ W[c, p] + b[c, p]``.
    """
    batch = _Batch(X, y, weight, n_classes, C)
    theta, grad_max, iterations = _lbfgs(batch, max_iter, tol, history)
    if report is not None:
        report.update(iterations=iterations, cell_evaluations=batch.evaluations, products=dict(batch.products),
                      grad_max=grad_max, converged=grad_max <= tol)
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
        self.lam = (2.0 if K == 2 else 1.0) / (C * n)  # sklearn's C, per training row (see the module doc)
        self.x, self.xT, self.labels, self.row_weight = [], [], [], []
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
            self.x.append(x)
            self.xT.append(x.T.contiguous())
            self.row_weight.append(rw)
            self.labels.append(y[c].index_select(1, used).unsqueeze(0))  # (1, problem, row)
        self.mean, self.scale = torch.stack(means), torch.stack(scales)  # (cell, problem, d)
        self.centre = torch.stack(centre)  # (cell, d)
        eigenvalues, self.Q = torch.linalg.eigh(torch.stack(corr).double())
        self.Q = self.Q.to(self.dtype)
        self.eigenvalues = eigenvalues.clamp_min(0).to(self.dtype).view(self.cells, 1, 1, d)
        # The CE Hessian at zero is Corr (x) (I - 1 1^T / K) / K: curvature 1 / K for every class.
        self._set_curvature(torch.full((self.cells, self.problems, K), 1.0 / K, dtype=self.dtype, device=self.device))
        self.evaluations = 0
        self.products: Counter[tuple[int, int, int, int]] = Counter()

    def _set_curvature(self, curvature: Tensor) -> None:
        """Per (cell, problem, class) curvature of CE along the features' correlation matrix."""
        self.bias_curvature = curvature
        self.denominator = curvature.unsqueeze(-1) * self.eigenvalues + self.lam.view(self.cells, self.problems, 1, 1)

    def weights(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Raw-space weights (cell, problem, cls, d) and intercepts of centred rows."""
        W = theta[..., : self.d] / self.scale.unsqueeze(2)
        return W, theta[..., self.d] - (W * self.mean.unsqueeze(2)).sum(-1)

    def raw(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        W, b = self.weights(theta)
        b = b - (W * self.centre.view(self.cells, 1, 1, self.d)).sum(-1)
        return W.transpose(2, 3).contiguous(), b

    def evaluate(self, theta: Tensor, need: Tensor, curvature: bool = False) -> tuple[Tensor, Tensor]:
        """Objective (cell, problem) and gradient at ``theta`` of the problems marked in ``need``
        (cell, problem); the others' entries are meaningless. Only the marked problems' columns of a
        cell's matrix products are computed, and cells without one are skipped. With ``curvature``
        the marked problems' preconditioner takes each class's mean ``p (1 - p)`` here as its curvature."""
        P, K, d = self.problems, self.K, self.d
        f = torch.zeros((self.cells, P), dtype=self.dtype, device=self.device)
        grad = torch.zeros_like(theta)
        W, b = self.weights(theta)
        Wk = W.transpose(1, 2)  # (cell, cls, problem, d)
        counts = need.sum(1).tolist()
        measured = self.bias_curvature.clone() if curvature else None
        for c, count in enumerate(counts):
            if count == 0:
                continue
            self.evaluations += 1
            if count == P:
                which, Wc, bc, labels, rw = slice(None), Wk[c], b[c], self.labels[c], self.row_weight[c]
            else:
                which = need[c].nonzero().squeeze(1)
                Wc, bc = Wk[c].index_select(1, which), b[c].index_select(0, which)
                labels, rw = self.labels[c].index_select(1, which), self.row_weight[c].index_select(0, which)
            rows = self.x[c].shape[0]
            self.products[(1, K * count, d, rows)] += 1
            self.products[(1, K * count, rows, d)] += 1
            # Logits in base 2 (weights scaled by log2 e): exp2 is several times faster than exp on a CPU.
            logits = torch.mm(Wc.reshape(K * count, d) * LOG2E, self.xT[c]).view(K, count, rows)
            logits += bc.T.unsqueeze(-1) * LOG2E
            picked = logits.gather(0, labels).squeeze(0)  # the label's logit, (problem, row)
            top = logits.amax(0)
            e = logits.sub_(top).exp2_()
            total = e.sum(0)
            f[c, which] = ((total.log2() + top - picked) * rw).sum(-1) * LN2
            if measured is not None:
                p = e / total
                measured[c, which] = (p * (1 - p) * rw).sum(-1).T.clamp_min(1e-6)
            G = e.mul_((rw / total).unsqueeze(0)).scatter_add_(0, labels, -rw.unsqueeze(0))  # d(mean CE) / d logits
            gb = G.sum(-1).T  # (problem, cls)
            gW = torch.mm(G.view(K * count, rows), self.x[c]).view(K, count, d).transpose(0, 1)
            grad[c, which, :, :d] = gW - gb.unsqueeze(-1) * self.mean[c, which].unsqueeze(1)
            grad[c, which, :, d] = gb
        V = theta[..., :d]
        f += 0.5 * self.lam * V.square().sum((2, 3))
        grad[..., :d] /= self.scale.unsqueeze(2)
        grad[..., :d] += self.lam.view(self.cells, P, 1, 1) * V
        if measured is not None:
            self._set_curvature(measured)
        return f, grad

    def precondition(self, g: Tensor, cells: Tensor | None = None) -> Tensor:
        """``(c Corr + lambda I)^-1`` on the weights and ``1 / c`` on the intercepts, ``c`` the
        curvature of each class (``1 / K`` at the start). ``cells``: the indices of the cells ``g``
        holds (default: all)."""
        Q, denominator, bias = self.Q, self.denominator, self.bias_curvature
        if cells is not None:
            # Q keeps its layout (column-major per cell, as eigh gives it), so every product is the same.
            Q = Q.transpose(1, 2).index_select(0, cells).transpose(1, 2)
            denominator, bias = denominator.index_select(0, cells), bias.index_select(0, cells)
        n, P, K, d = g.shape[0], self.problems, self.K, self.d
        self.products[(n, P * K, d, d)] += 2
        z = torch.bmm(g[..., :d].reshape(n, P * K, d), Q).view(n, P, K, d) / denominator
        out = torch.empty_like(g)
        out[..., :d] = torch.bmm(z.view(n, P * K, d), Q.transpose(1, 2)).view(n, P, K, d)
        out[..., d] = g[..., d] / bias
        return out


def _lbfgs(batch: _Batch, max_iter: int, tol: float, history: int,
           retake_after: int = 10) -> tuple[Tensor, Tensor, Tensor]:
    """Preconditioned L-BFGS with a backtracking (Armijo) line search, every problem on its own.

    Every pass evaluates each still-running problem once: a new direction's first step, or the
    halved step of a rejected one, so a retry rides in the same matrix product as the other
    problems' steps instead of a second, narrower one. After ``retake_after`` passes the
    preconditioner's curvature is measured again where the problems then are (it was the Hessian at
    zero; confident predictions curve far less). Returns theta, the final largest absolute gradient
    entry and the accepted iterations, per problem.
    """
    cells, P = batch.cells, batch.problems
    theta = torch.zeros((cells, P, batch.K, batch.d + 1), dtype=batch.dtype, device=batch.device)
    f, g = batch.evaluate(theta, torch.ones((cells, P), dtype=torch.bool, device=batch.device))

    def per_problem(v: Tensor) -> Tensor:
        return v.view(cells, P, 1, 1)

    S: list[Tensor] = []
    Y: list[Tensor] = []
    rho: list[Tensor] = []
    iterations = torch.zeros((cells, P), dtype=torch.long, device=batch.device)
    halvings = torch.zeros_like(iterations)
    active = _grad_max(g) > tol
    fresh = active.clone()  # at a new point: needs a direction
    direction = torch.zeros_like(theta)
    slope = torch.zeros((cells, P), dtype=batch.dtype, device=batch.device)
    step = torch.ones_like(slope)
    passes = 0
    while active.any():
        if fresh.any():
            # Directions only in the cells with a problem at a new point: the others keep theirs.
            some = fresh.any(1)
            cut = None if bool(some.all()) else some.nonzero().squeeze(1)

            def part(v: Tensor, cut: Tensor | None = cut) -> Tensor:
                return v if cut is None else v.index_select(0, cut)

            g_part, fresh_part = part(g), part(fresh)
            new = _direction(batch, g_part, [part(s) for s in S], [part(v) for v in Y], [part(r) for r in rho], cut)
            new_slope = _dot(g_part, new)
            uphill = new_slope >= 0
            if (uphill & fresh_part).any():  # numerically lost: restart from the preconditioned gradient
                new = torch.where(uphill.view(-1, P, 1, 1), -batch.precondition(g_part, cut), new)
                new_slope = _dot(g_part, new)
            new = torch.where(fresh_part.view(-1, P, 1, 1), new, part(direction))
            new_slope = torch.where(fresh_part, new_slope, part(slope))
            direction = new if cut is None else direction.index_copy(0, cut, new)
            slope = new_slope if cut is None else slope.index_copy(0, cut, new_slope)
            step = torch.where(fresh, 1.0, step)
            halvings = torch.where(fresh, 0, halvings)
        passes += 1
        trial = theta + per_problem(step * active) * direction
        f_trial, g_trial = batch.evaluate(trial, active, curvature=passes == retake_after)
        accept = active & (f_trial <= f + 1e-4 * step * slope)
        if accept.any():
            s = torch.where(per_problem(accept), trial - theta, 0.0)
            yy = torch.where(per_problem(accept), g_trial - g, 0.0)
            sy = _dot(s, yy)
            S.append(s)
            Y.append(yy)
            rho.append(torch.where(sy > 1e-12, 1.0 / sy.clamp_min(1e-12), 0.0))  # 0: the pair is skipped
            if len(S) > history:
                del S[0], Y[0], rho[0]
            theta = torch.where(per_problem(accept), trial, theta)
            f = torch.where(accept, f_trial, f)
            g = torch.where(per_problem(accept), g_trial, g)
            iterations += accept
        rejected = active & ~accept
        step = torch.where(rejected, step * 0.5, step)
        halvings += rejected
        # 20 halvings without a decrease: the problem is as converged as float precision allows.
        active &= (halvings < 20) & (_grad_max(g) > tol) & (iterations < max_iter)
        fresh = accept & active
    return theta, _grad_max(g), iterations


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum((2, 3))


def _grad_max(g: Tensor) -> Tensor:
    return g.abs().amax((2, 3))


def _direction(batch: _Batch, g: Tensor, S: list[Tensor], Y: list[Tensor], rho: list[Tensor],
               cells: Tensor | None = None) -> Tensor:
    """``-H g`` by the two-loop recursion, ``H`` the L-BFGS inverse Hessian from the preconditioner;
    ``cells``: the indices of the cells ``g`` and the history hold (default: all)."""
    n, P = g.shape[0], batch.problems
    q = g.clone()
    alphas = []
    for s, yy, r in zip(reversed(S), reversed(Y), reversed(rho)):
        a = r * _dot(s, q)
        q -= a.view(n, P, 1, 1) * yy
        alphas.append(a)
    z = batch.precondition(q, cells)
    if S:
        gamma = torch.where(rho[-1] > 0, 1.0 / (rho[-1] * _dot(Y[-1], batch.precondition(Y[-1], cells))), 1.0)
        z *= gamma.view(n, P, 1, 1)
    for s, yy, r, a in zip(S, Y, rho, reversed(alphas)):
        z += (a - r * _dot(yy, z)).view(n, P, 1, 1) * s
    return z.neg_()


def predict_logits(X: Float[Tensor, "cell row d"], W: Float[Tensor, "cell problem d cls"],
                   b: Float[Tensor, "cell problem cls"]) -> Float[Tensor, "cell problem row cls"]:
    """Logits of every problem's probe for every row of its cell."""
    return torch.einsum("crd,cpdk->cprk", X, W) + b.unsqueeze(2)


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression with L2 (scikit-learn's ``C``), on standardised features.

    Attributes (after ``fit``), as scikit-learn's ``LogisticRegression``: ``classes_``, ``coef_``
    and ``intercept_`` in the original feature space (one row per class; a single row, the second
    class's score, with two classes), ``n_features_in_`` and ``n_iter_`` (shape (1,)). A fit that
    stops at ``max_iter`` above ``tol`` warns with a :class:`~sklearn.exceptions.ConvergenceWarning`.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 100, tol: float = 1e-4, device: str = "cpu"):
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.device = device

    def fit(self, X, y) -> LinearProbe:
        X, y = validate_data(self, X, y, dtype=np.float64, ensure_min_samples=2, ensure_all_finite=False)
        _check_finite(X)
        check_classification_targets(y)
        if not (isinstance(self.C, (int, float)) and self.C > 0):
            raise DlmprobeInputError(f"C must be a positive number, got {self.C!r}")
        self.classes_, encoded = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise DlmprobeInputError(f"a probe needs at least 2 classes in y, got only {self.classes_.tolist()}")
        Xt = torch.from_numpy(X.astype(np.float32)).to(self.device).unsqueeze(0)
        yt = torch.as_tensor(encoded, dtype=torch.long, device=self.device).view(1, 1, -1)
        weight = torch.ones(yt.shape, dtype=torch.float32, device=self.device)
        report: dict = {}
        W, b = fit_logistic(Xt, yt, weight, len(self.classes_), self.C, self.max_iter, self.tol, report=report)
        coef, intercept = W[0, 0].T.cpu().double().numpy(), b[0, 0].cpu().double().numpy()
        if len(self.classes_) == 2:  # scikit-learn's binary form: the second class's score minus the first's
            coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
        self.coef_, self.intercept_ = coef, intercept
        self.n_iter_ = np.array([int(report["iterations"][0, 0])], dtype=np.int32)
        if not bool(report["converged"][0, 0]):
            warnings.warn(f"LinearProbe stopped after {self.n_iter_[0]} iterations with its largest gradient entry "
                          f"{float(report['grad_max'][0, 0]):.2g} above tol={self.tol}; raise max_iter",
                          ConvergenceWarning, stacklevel=2)
        return self

    def decision_function(self, X) -> np.ndarray:
        """Scores ``(n, n_classes)``; with two classes ``(n,)``, the second class's score minus the first's."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False, ensure_all_finite=False)
        _check_finite(X)
        scores = X @ self.coef_.T + self.intercept_
        return scores[:, 0] if len(self.classes_) == 2 else scores

    def predict_proba(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], axis=1)
        scores = scores - scores.max(axis=1, keepdims=True)
        probs = np.exp(scores)
        return probs / probs.sum(axis=1, keepdims=True)

    def predict(self, X) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)]

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
    def load(cls, path: str | Path) -> LinearProbe:
        """Read a probe written by :meth:`save`; bad content is a one-line error naming file and field."""
        path = Path(path)
        meta_path, weights_path = path.with_suffix(".json"), path.with_suffix(".safetensors")
        for file in (meta_path, weights_path):
            if not file.is_file():
                raise FileNotFoundError(f"no probe at {path}: expected {file}")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DlmprobeInputError(f"{meta_path}: expected JSON, got unreadable content ({err})") from None
        if not isinstance(meta, dict):
            raise DlmprobeInputError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
        params, classes, n_features = meta.get("params"), meta.get("classes"), meta.get("n_features_in")

        def bad(field: str, expected: str, got) -> DlmprobeInputError:
            return DlmprobeInputError(f"{meta_path}: field {field!r} must be {expected}, got {got!r}")

        known = cls().get_params()
        if not isinstance(params, dict) or set(params) - set(known):
            raise bad("params", f"an object with keys among {sorted(known)}", params)
        if not isinstance(classes, list) or len(classes) < 2 or len(set(map(repr, classes))) != len(classes):
            raise bad("classes", "a list of at least 2 distinct class labels", classes)
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise bad("n_features_in", "a positive integer", n_features)
        try:
            tensors = load_file(str(weights_path))
        except SafetensorError as err:
            raise DlmprobeInputError(f"{weights_path}: expected a safetensors file, got unreadable content ({err})") from None
        rows = 1 if len(classes) == 2 else len(classes)
        for name, shape in (("coef", (rows, n_features)), ("intercept", (rows,))):
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise DlmprobeInputError(f"{weights_path}: tensor {name!r} must have shape {shape}, got {got}")
        probe = cls(**params)
        probe.classes_ = np.array(classes)
        probe.n_features_in_ = n_features
        probe.coef_ = tensors["coef"].double().numpy()
        probe.intercept_ = tensors["intercept"].double().numpy()
        return probe


def _check_finite(X: np.ndarray) -> None:
    if not np.isfinite(X).all():
        raise DlmprobeInputError(f"probe features must be finite, got NaN or inf in {int((~np.isfinite(X)).sum())} entries")
