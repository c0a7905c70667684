"""FWSVD / VAC: SVD weighted by the diagonal Fisher information.

Row importances (sum of the squared-gradient Fisher over each output row) are mapped through
s(F) = F^p (VAC: p = 1/3 beats FWSVD's 1/2), normalised to mean 1 and clamped; "rows+cols" also
scales the columns the same way, as VAC does. SVD of diag(r) W diag(c), unscaled after.
"""

from .base import Method, Weighting, normalized_scale, register


@register("fwsvd")
class FisherWeightedSVD(Method):
    needs_fisher = True

    def _scales(self, weight, stats):
        o = self.options
        rows = normalized_scale(stats.gradients.fisher_rows, o.fisher_exponent, o.scale_clamp).to(weight.device)
        if o.fisher_mode == "rows+cols":
            cols = normalized_scale(stats.gradients.fisher_cols, o.fisher_exponent, o.scale_clamp).to(weight.device)
        else:
            cols = rows.new_ones(weight.shape[1])
        return rows, cols

    def weighting(self, weight, stats):
        rows, cols = self._scales(weight, stats)
        return Weighting(rows[:, None] * weight * cols[None, :], lambda left: left / rows[:, None],
                         lambda right: right / cols[None, :], metric="||diag(r) (W - W') diag(c)||_F^2")

    def loss_scale(self, weight, stats):
        rows, cols = self._scales(weight, stats)
        return self._output_energy(stats) * self._input_energy(stats) / float(rows.square().mean() * cols.square().mean())
