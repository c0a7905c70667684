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
    factor: torch.Tensor  # S, with S @ S.T = G_damped
    inverse: torch.Tensor  # S^-1
    used_cholesky: bool


def damped(gram: torch.Tensor, relative_damping: float) -> torch.Tensor:
    g = gram.double()
    scale = g.diagonal().mean().clamp_min(1e-12)
    return g + relative_damping * scale * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def sqrt_factor(gram: torch.Tensor, relative_damping: float) -> SqrtFactor:
    g = damped(gram, relative_damping)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
        if torch.isfinite(inverse).all():
            return SqrtFactor(chol, inverse, True)
    values, vectors = torch.linalg.eigh(g)
    floor = max(relative_damping, 1e-10) * values.abs().max().clamp_min(1e-12)
    root = values.clamp_min(floor).sqrt()
    return SqrtFactor(vectors * root, vectors.T / root[:, None], False)
