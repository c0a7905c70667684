"""FWSVD / VAC: SVD weighted by the diagonal Fisher information.

Row importances (sum of the squared-gradient Fisher over each output row) are mapped through
s(F) = F^p (VAC: p = 1/3 beats FWSVD's 1/2), normalised to mean 1 and clamped, and the columns
are scaled the same way, as VAC does. SVD of diag(r) W diag(c), unscaled after. (FWSVD's rows-only
weighting collapsed on the demo model, PPL in the millions: docs/results.md.)
"""

from dataclasses import dataclass

from ..errors import VaclmError
from ..options import option
from .base import Method, Weighting, normalized_scale, register


@dataclass(frozen=True)
class FisherOptions:
    fisher_exponent: float = option(1.0 / 3.0, "fwsvd: importance scaling s(F) = F^P (VAC: 1/3 beats 1/2)")
    scale_clamp: float = option(1e3, "fwsvd/asvd: scales are clamped to [mean/CLAMP, mean*CLAMP]")

    def __post_init__(self):
        if not self.scale_clamp >= 1:
            raise VaclmError(f"scale clamp must be >= 1, got {self.scale_clamp}")


@register("fwsvd")
class FisherWeightedSVD(Method):
    Options = FisherOptions
    needs_fisher = True

    def _scales(self, weight, stats):
        o = self.options
        rows = normalized_scale(stats.gradients.fisher_rows, o.fisher_exponent, o.scale_clamp).to(weight.device)
        cols = normalized_scale(stats.gradients.fisher_cols, o.fisher_exponent, o.scale_clamp).to(weight.device)
        return rows, cols

    def weighting(self, weight, stats):
        rows, cols = self._scales(weight, stats)
        return Weighting(rows[:, None] * weight * cols[None, :], lambda left: left / rows[:, None],
                         lambda right: right / cols[None, :], metric="||diag(r) (W - W') diag(c)||_F^2")

    def loss_scale(self, weight, stats):
        rows, cols = self._scales(weight, stats)
        return self._output_energy(stats) * self._input_energy(stats) / float(rows.square().mean() * cols.square().mean())
