"""Subspaces of activation space to erase or steer in, as an edit ``h - write readᵀ (h - x)``.

* :func:`probe_subspace`: a multinomial probe's class directions, centred and orthonormalised;
* :func:`leace_subspace`: LEACE (Belrose et al. 2023, arXiv 2306.03819), the least-squares edit
  after which no linear classifier reads the label better than a constant;
* :func:`random_subspace` and :func:`pca_subspace`: controls of a chosen rank.

Example:
    >>> space = leace_subspace(X_train, y_train)
    >>> erased = space.move(torch.as_tensor(X), torch.as_tensor(X_train.mean(0)))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class Subspace:
    """A rank-``r`` subspace of activation space, as the edit ``h - write readᵀ (h - x)``.

    ``read`` (d, r) takes the coordinates of ``h - x`` in the subspace, ``write`` (d, r) maps them
    back, so the edit gives ``h`` the subspace component of the point ``x`` and keeps the rest. For
    an orthogonal projection both are the same orthonormal basis.
    """

    read: Float[Tensor, "d rank"]
    write: Float[Tensor, "d rank"]

    @property
    def rank(self) -> int:
        return self.read.shape[1]

    def move(self, h: Float[Tensor, "row d"], towards: Float[Tensor, "row d"] | Float[Tensor, " d"],
             alpha: float = 1.0) -> Float[Tensor, "row d"]:
        """``h - α write readᵀ (h - towards)``: at ``α = 1`` h's component in the subspace is towards'."""
        return h - alpha * (((h - towards) @ self.read) @ self.write.T)

    def to(self, device: torch.device | str) -> Subspace:
        return Subspace(self.read.to(device), self.write.to(device))


def probe_subspace(coef: Float[np.ndarray, "cls d"]) -> Subspace:
    """The orthonormalised class directions of a multinomial probe, centred over classes.

    Only differences between class logits matter, so the mean direction is removed first; the
    rank is at most ``C - 1``.
    """
    centred = np.asarray(coef, dtype=np.float64)
    centred = centred - centred.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(centred.T, full_matrices=False)
    basis = torch.as_tensor(u[:, : _rank(s)], dtype=torch.float32)
    return Subspace(basis, basis)


def leace_subspace(X: Float[np.ndarray, "row d"], y: Int[np.ndarray, " row"]) -> Subspace:
    """The LEACE eraser of labels ``y`` from features ``X`` (Belrose et al. 2023, Theorem 4.3).

    ``h - W⁺ P W (h - μ)`` with ``W`` the whitening ``Σ^{-1/2}`` and ``P`` the orthogonal
    projection onto the column space of ``W Σ_xz`` (one-hot labels): the smallest edit in mean
    squared distance after which every class has the same mean, so no linear probe beats a constant.
    """
    X = np.asarray(X, dtype=np.float64)
    centred = X - X.mean(axis=0)
    values, vectors = np.linalg.eigh(centred.T @ centred / len(X))
    keep = values > values.max() * 1e-8
    vectors, root = vectors[:, keep], np.sqrt(values[keep])
    whiten, unwhiten = (vectors / root) @ vectors.T, (vectors * root) @ vectors.T
    onehot = (y[:, None] == np.unique(y)[None, :]).astype(np.float64)
    cross = centred.T @ (onehot - onehot.mean(axis=0)) / len(X)  # Σ_xz, (d, classes)
    u, s, _ = np.linalg.svd(whiten @ cross, full_matrices=False)
    u = u[:, : _rank(s)]
    return Subspace(read=torch.as_tensor(whiten @ u, dtype=torch.float32),
                    write=torch.as_tensor(unwhiten @ u, dtype=torch.float32))


def random_subspace(d: int, rank: int, seed: int) -> Subspace:
    """A uniformly random orthonormal basis of ``rank`` directions in ``d`` dimensions."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, rank)))
    basis = torch.as_tensor(q * np.sign(np.diag(r)), dtype=torch.float32)  # sign fix: uniform (Haar)
    return Subspace(basis, basis)


def pca_subspace(X: Float[np.ndarray, "row d"], rank: int) -> Subspace:
    """The ``rank`` highest-variance directions of ``X``, as an orthonormal basis."""
    X = np.asarray(X, dtype=np.float64)
    centred = X - X.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    basis = torch.as_tensor(vectors[:, ::-1][:, :rank].copy(), dtype=torch.float32)
    return Subspace(basis, basis)


def _rank(singular_values: np.ndarray) -> int:
    """Numerical rank: singular values above a millionth of the largest."""
    if not singular_values.size or singular_values.max() <= 0:
        return 0
    return int((singular_values > singular_values.max() * 1e-6).sum())
