"""Truncated SVD with the error of every truncation, from one decomposition."""

from __future__ import annotations

from dataclasses import dataclass
import torch


@dataclass
class TruncatedSVD:
    """M ~= left[:, :r] @ right[:r] for every r <= max_rank (truncations are nested).

    `errors[r]` is ||M - M_r||_F^2 = sum of the squared singular values from r on; errors[0] is
    ||M||_F^2 and errors[min(out, in)] is 0. Singular values are split evenly (sqrt on each side),
    which keeps both factors at the same scale.
    """

    left: torch.Tensor  # out x max_rank
    right: torch.Tensor  # max_rank x in
    errors: torch.Tensor  # (min(out, in) + 1,), float64


def tail_sums(energies: torch.Tensor) -> torch.Tensor:
    """errors[r] = sum_{i >= r} e_i, for r = 0 .. len(e): the error of dropping components r on."""
    tail = torch.flip(torch.cumsum(torch.flip(energies, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)])


def tail_errors(singular_values: torch.Tensor) -> torch.Tensor:
    """errors[r] = sum_{i >= r} s_i^2, for r = 0 .. len(s)."""
    return tail_sums(singular_values.square())


def error_curve(matrix: torch.Tensor) -> torch.Tensor:
    """The errors of every truncation; no singular vectors are formed (cheaper)."""
    return tail_errors(torch.linalg.svdvals(matrix.double()))


def truncated_svd(matrix: torch.Tensor, max_rank: int) -> TruncatedSVD:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    k = min(max_rank, s.numel())
    root = s[:k].sqrt()
    return TruncatedSVD(left=u[:, :k] * root, right=root[:, None] * vh[:k], errors=tail_errors(s))
