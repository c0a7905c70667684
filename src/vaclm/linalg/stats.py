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
    """Per-layer statistics of the loss gradient g = dL/dy at the layer output y = W x.

    Always: the energy of g per output (sum of g^2, a vector; what allocation prices layers by).
    With `cov`: B = E[g g^T] (out x out), the output side of the Kronecker-factored Fisher.
    With `fisher`: row and column sums of the diagonal Fisher of W, the sum over samples of
    (dL/dW)^2 with dL/dW = G^T X for a sample's output gradients G and inputs X. Only the sums
    are kept (they are what the Fisher-weighted methods use); the full out x in matrix would
    double the model's memory. dL/dW is formed `chunk` rows at a time to bound the temporary.
    """

    def __init__(self, out_dim: int, in_dim: int, cov: bool = True, fisher: bool = True,
                 device: torch.device | str = "cpu", chunk: int = 4096):
        self.out_dim, self.in_dim = out_dim, in_dim
        self.sq_sum = torch.zeros(out_dim, dtype=torch.float64, device=device)
        self.cov = torch.zeros(out_dim, out_dim, dtype=torch.float64, device=device) if cov else None
        self.fisher_rows = torch.zeros(out_dim, dtype=torch.float64, device=device) if fisher else None
        self.fisher_cols = torch.zeros(in_dim, dtype=torch.float64, device=device) if fisher else None
        self.tokens = 0
        self.samples = 0
        self.chunk = chunk
        # L is a sequence's *mean* loss over its T' labelled positions, so each token's gradient
        # carries 1/T': B times `fisher_scale` = T T' is the per-token Fisher (gradient_stats sets it)
        self.fisher_scale = 1.0

    def add_sample(self, x: torch.Tensor, g: torch.Tensor) -> None:
        """One sample's inputs x (tokens x in) and output gradients g (tokens x out)."""
        g = g.detach().reshape(-1, g.shape[-1]).float()
        self.sq_sum += g.square().sum(0).to(self.sq_sum)
        if self.cov is not None:
            self.cov += (g.T @ g).to(self.cov)
        if self.fisher_rows is not None:
            x = x.detach().reshape(-1, x.shape[-1]).float()
            for start in range(0, g.shape[1], self.chunk):
                squared = (g[:, start : start + self.chunk].T @ x).square()  # rows of (dL/dW)^2
                self.fisher_rows[start : start + self.chunk] += squared.sum(1).to(self.fisher_rows)
                self.fisher_cols += squared.sum(0).to(self.fisher_cols)
        self.tokens += g.shape[0]
        self.samples += 1

    @property
    def mean_cov(self) -> torch.Tensor:
        if self.cov is None:
            raise ValueError("output-gradient covariance was not collected")
        return self.cov / max(self.tokens, 1)

    @property
    def output_energy(self) -> float:
        """Mean diagonal of B = E[g g^T], without needing B itself."""
        return float(self.sq_sum.sum()) / max(self.tokens, 1) / self.out_dim
