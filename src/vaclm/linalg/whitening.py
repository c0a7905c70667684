"""Square-root factors of damped covariance matrices, for whitening before an SVD.

For a symmetric PSD G we return S and S^-1 with S S^T = G + damping. Cholesky is tried first
(S lower triangular); a Gram that is not positive definite after damping (dead input features,
too few samples, round-off) falls back to eigh with clamped eigenvalues. Everything in float64:
the condition numbers of LLM activation Grams make float32 whitening visibly worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SqrtFactor:
    """S with S @ S.T = G_damped: lower triangular (Cholesky) or V diag(sqrt(lambda)) (eigh).

    Products with S^-1 go through triangular solves, which cost a fraction of forming S^-1 for the
    1536-wide Grams of a 135M model (and 14336-wide ones of a 7B); `inverse` forms it on demand.
    """

    factor: torch.Tensor
    used_cholesky: bool
    _inverse: torch.Tensor | None = None  # eigh: known at once; Cholesky: formed only if asked for

    @property
    def inverse(self) -> torch.Tensor:
        if self._inverse is None:
            eye = torch.eye(self.factor.shape[0], dtype=self.factor.dtype, device=self.factor.device)
            self._inverse = torch.linalg.solve_triangular(self.factor, eye, upper=False)
        return self._inverse

    def times_inverse(self, m: torch.Tensor) -> torch.Tensor:
        """m @ S^-1."""
        if self._inverse is not None:
            return m @ self._inverse
        return torch.linalg.solve_triangular(self.factor, m, upper=False, left=False)

    def times_inverse_t(self, m: torch.Tensor) -> torch.Tensor:
        """m @ S^-T."""
        if self._inverse is not None:
            return m @ self._inverse.T
        return torch.linalg.solve_triangular(self.factor.T, m, upper=True, left=False)

    def inverse_t_times(self, m: torch.Tensor) -> torch.Tensor:
        """S^-T @ m."""
        if self._inverse is not None:
            return self._inverse.T @ m
        return torch.linalg.solve_triangular(self.factor.T, m, upper=True)


def damped(gram: torch.Tensor, relative_damping: float) -> torch.Tensor:
    g = gram.double()
    scale = g.diagonal().mean().clamp_min(1e-12)
    return g + relative_damping * scale * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def sqrt_factor(gram: torch.Tensor, relative_damping: float) -> SqrtFactor:
    g = damped(gram, relative_damping)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        # invertible, and S^-1 stays finite, unless a diagonal entry is below the square root of
        # the smallest float64 (then eigh's clamped eigenvalues are the safer factor)
        if torch.isfinite(chol).all() and bool(chol.diagonal().min() > 1e-150):
            return SqrtFactor(chol, True)
    values, vectors = torch.linalg.eigh(g)
    floor = max(relative_damping, 1e-10) * values.abs().max().clamp_min(1e-12)
    root = values.clamp_min(floor).sqrt()
    return SqrtFactor(vectors * root, False, vectors.T / root[:, None])
