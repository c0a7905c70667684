"""Truncated SVD with the error of every truncation, from one decomposition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def priced_errors(u: torch.Tensor, s: torch.Tensor, price_left: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return tail_sums(price_left(u * s).square().sum(0))


def error_curve(matrix: torch.Tensor, price_left: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The errors of every truncation; without `price_left` no singular vectors are formed (cheaper)."""
    if price_left is None:
        return tail_errors(torch.linalg.svdvals(matrix.double()))
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return priced_errors(u, s, price_left)


def truncated_svd(matrix: torch.Tensor, max_rank: int,
                  price_left: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TruncatedSVD:
    """`price_left` measures the errors in another left metric than the one truncated in: for
    M = U S V^T and a map P, dropping components r on costs ||P U_{>r} S_{>r} V_{>r}^T||^2
    = sum_{i >= r} ||P u_i s_i||^2 (V has orthonormal rows), so each component has its own price."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    errors = tail_errors(s) if price_left is None else priced_errors(u, s, price_left)
    k = min(max_rank, s.numel())
    root = s[:k].sqrt()
    return TruncatedSVD(left=u[:, :k] * root, right=root[:, None] * vh[:k], errors=errors)
