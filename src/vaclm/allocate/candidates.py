"""Candidate ranks of one matrix, with their cost and estimated loss, for the knapsack."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Candidates:
    ranks: list[int | None]  # None: keep the dense matrix
    costs: np.ndarray  # parameters stored for each choice
    losses: np.ndarray  # estimated loss increase of each choice


def rank_grid(shape: tuple[int, int], align: int) -> list[int]:
    """Ranks align, 2*align, ... while factorising still saves parameters (r(out+in) < out*in)."""
    out_f, in_f = shape
    return [r for r in range(align, min(out_f, in_f) + 1, align) if r * (out_f + in_f) < out_f * in_f]


def candidates(shape: tuple[int, int], errors: np.ndarray, scale: float, align: int,
               bytes_per_param: float = 1.0, dense_bytes_per_param: float | None = None) -> Candidates:
    """`errors[r]`: truncation error at rank r in the method's metric; `scale` makes it a loss."""
    out_f, in_f = shape
    ranks: list[int | None] = rank_grid(shape, align)
    costs = [r * (out_f + in_f) * bytes_per_param for r in ranks]
    losses = [float(errors[r]) * scale for r in ranks]
    dense_bpp = bytes_per_param if dense_bytes_per_param is None else dense_bytes_per_param
    ranks.append(None)
    costs.append(out_f * in_f * dense_bpp)
    losses.append(0.0)
    return Candidates(ranks, np.asarray(costs, float), np.asarray(losses, float))
