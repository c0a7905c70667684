"""Which intermediate neurons of an MLP to keep, and the least-squares refit of the down projection.

The MLP's output is D h (h: the down projection's input, one entry per intermediate neuron).
Keeping only the neurons S and refitting D on them gives D' = D A[:, S] A[S, S]^-1 with
A = E[h h^T], the least-squares optimum for every output row at once. What is left,
tr(B D (A - A[:, S] A[S, S]^-1 A[S, :]) D^T) with B = E[g g^T] the gradient covariance at the
MLP's output, is the Kronecker-Fisher quadratic form of the change of D, the metric gfwsvd's
truncation errors are in: times the same unit (methods/base.py `_fisher_unit`) it estimates the
loss increase in nats per token, so pruning and low-rank candidates are priced alike.

Neurons are removed by greedy backward elimination, Optimal-Brain-Surgeon style. With P = A[S, S]^-1
and the refitted D', removing block J raises the error by tr(B D'_J P_JJ^-1 D'_J^T); the cheapest
neurons by the single-neuron estimate (D'_j^T B D'_j / P_jj) go first, then P and D' are updated
exactly (block Schur complement), so each width's error is that of its refit. (MoDeGPT's
ridge-leverage order, which sees the activations only, measured worse: docs/pruning.md.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PruneCurve:
    order: torch.Tensor  # neuron indices, most important first: width w keeps order[:w]
    widths: list[int]  # widths with a known error, descending from the full width
    errors: list[float]  # errors[k]: refit error (the metric above) keeping widths[k] neurons

    def kept(self, width: int) -> torch.Tensor:
        return self.order[:width].sort().values


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """gram + damping * mean(diag) * I: neurons that never fire must not make A[S, S] singular."""
    scale = float(gram.diagonal().mean()) or 1.0
    return gram + damping * scale * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def removal_curve(gram: torch.Tensor, down: torch.Tensor, cov: torch.Tensor | None, step: int,
                  damping: float = 1e-6, min_width: int = 0) -> PruneCurve:
    """Remove neurons `step` at a time (the first block takes the remainder, so widths stay
    multiples of `step`) down to `min_width`, recording the refit error after each block.

    gram: m x m input Gram of the down projection (mean over tokens); down: out x m weight;
    cov: out x out gradient covariance at its output, None for the identity.
    """
    a = damped(gram.double(), damping)
    m = a.shape[0]
    w = down.double().clone()  # the refit D' on the kept neurons (removed columns are zero)
    p = torch.linalg.inv(a)
    b = None if cov is None else cov.double().to(a.device)
    idx = torch.arange(m, device=a.device)  # original indices of the kept neurons; w, p are over them
    bw = w if b is None else b @ w  # B D', updated with D' (a fresh product per step costs 70x the update)
    removed: list[torch.Tensor] = []
    widths, errors, total = [m], [0.0], 0.0
    while len(idx) - step >= min_width and len(idx) > 0:
        count = len(idx) % step or step
        single = (w * bw).sum(0) / p.diagonal()
        block = single.argsort()[:count]
        error, w, bw, p, keep = _remove(w, bw, p, block, b is None)
        total += error
        removed.append(idx[block])
        idx = idx[keep]
        widths.append(len(idx))
        errors.append(total)
    order = torch.cat([idx] + removed[::-1]).cpu()
    return PruneCurve(order, widths, errors)


def _remove(w: torch.Tensor, bw: torch.Tensor, p: torch.Tensor, block: torch.Tensor, identity: bool):
    """Drop positions `block`: (error added, refit w, B w and p = A[S, S]^-1 over the rest, positions kept)."""
    keep = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    keep[block] = False
    pjj = p[block][:, block]
    wj, bwj = w[:, block], bw[:, block]
    pjr = p[block][:, keep]
    solved = torch.linalg.solve(pjj, pjr)  # P_JJ^-1 P_J,rest
    added = torch.linalg.solve(pjj, wj.T)  # P_JJ^-1 W_J^T
    error = float((bwj * added.T).sum())
    w = w[:, keep] - wj @ solved
    bw = w if identity else bw[:, keep] - bwj @ solved
    return error, w, bw, p[keep][:, keep] - pjr.T @ solved, keep


def refit_down(gram: torch.Tensor, down: torch.Tensor, kept: torch.Tensor, damping: float = 1e-6) -> torch.Tensor:
    """D' = D A[:, S] A[S, S]^-1 (out x |S|): the least-squares down projection on the kept neurons."""
    a = damped(gram.double(), damping)
    rhs = (down.double() @ a[:, kept]).T  # |S| x out
    return torch.linalg.solve(a[kept][:, kept], rhs).T


def refit_error(gram: torch.Tensor, down: torch.Tensor, cov: torch.Tensor | None, kept: torch.Tensor,
                damping: float = 1e-6) -> float:
    """tr(B dW A dW^T) of the refit, dW = D' P_S - D: the metric `removal_curve` records."""
    a = damped(gram.double(), damping)
    d = down.double()
    dw = -d.clone()
    dw[:, kept] += refit_down(gram, down, kept, damping)
    left = dw if cov is None else cov.double() @ dw
    return float((left * (dw @ a)).sum())
