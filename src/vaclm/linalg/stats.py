"""Running statistics of one linear layer, accumulated batch by batch (GPTQ's `add_batch`).

Memory per layer: the input Gram is in x in float64 (8 in^2 bytes: 2.6 MB for in = 576,
1.6 GB for in = 14336); the output-gradient covariance is out x out float64 likewise; Fisher row
and column sums are vectors. Nothing per token is kept.
"""

from __future__ import annotations

import torch


class InputStats:
    """Sum of x x^T (input Gram) and of |x| over tokens, for inputs of width `dim`."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.gram += (x.T @ x).to(self.gram)
        self.abs_sum += x.abs().sum(0).to(self.abs_sum)
        self.tokens += x.shape[0]

    @property
    def mean_gram(self) -> torch.Tensor:
        return self.gram / max(self.tokens, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


class GradientStats:
    """Output-gradient covariance B = E[g g^T] and diagonal-Fisher row/column sums of one layer.

    The diagonal Fisher of W is the mean over samples of (dL/dW)^2, with dL/dW = G^T X for a
    sample's output gradients G (tokens x out) and inputs X (tokens x in). Only its row sums (out)
    and column sums (in) are kept: they are what the Fisher-weighted methods use, and keeping the
    full out x in matrix would double the model's memory.
    """

    def __init__(self, out_dim: int, in_dim: int, device: torch.device | str = "cpu", chunk: int = 4096):
        self.cov = torch.zeros(out_dim, out_dim, dtype=torch.float64, device=device)
        self.fisher_rows = torch.zeros(out_dim, dtype=torch.float64, device=device)
        self.fisher_cols = torch.zeros(in_dim, dtype=torch.float64, device=device)
        self.tokens = 0
        self.samples = 0
        self.chunk = chunk  # rows of dL/dW formed at a time: bounds the temporary to chunk x in

    def add_sample(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """One sample's inputs x (tokens x in) and output gradients g (tokens x out)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        g = g.detach().reshape(-1, g.shape[-1]).float()
        self.cov += (g.T @ g).to(self.cov)
        for start in range(0, g.shape[1], self.chunk):
            grad_w = g[:, start : start + self.chunk].T @ x  # chunk x in: dL/dW rows
            squared = grad_w.square()
            self.fisher_rows[start : start + self.chunk] += squared.sum(1).to(self.fisher_rows)
            self.fisher_cols += squared.sum(0).to(self.fisher_cols)
        self.tokens += g.shape[0]
        self.samples += 1

    @property
    def mean_cov(self) -> torch.Tensor:
        return self.cov / max(self.tokens, 1)
