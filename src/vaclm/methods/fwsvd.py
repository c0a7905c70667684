"""FWSVD / VAC: SVD weighted by the diagonal Fisher information.

Row importances (sum of the squared-gradient Fisher over each output row) are mapped through
s(F) = F^p (VAC: p = 1/3 beats FWSVD's 1/2), normalised to mean 1 and clamped; "rows+cols" also
scales the columns the same way, as VAC does. SVD of diag(r) W diag(c), unscaled after.
"""

from ..linalg.svd import truncated_svd
from .base import Factorization, Method, normalized_scale, register


@register("fwsvd")
class FisherWeightedSVD(Method):
    needs_gradients = True

    def factorize(self, weight, stats, max_rank):
        self._require(stats)
        o = self.options
        rows = normalized_scale(stats.gradients.fisher_rows, o.fisher_exponent, o.scale_clamp)
        if o.fisher_mode == "rows+cols":
            cols = normalized_scale(stats.gradients.fisher_cols, o.fisher_exponent, o.scale_clamp)
        else:
            cols = rows.new_ones(weight.shape[1])
        t = truncated_svd(rows[:, None] * weight.double() * cols[None, :], max_rank)
        return Factorization(
            t.left / rows[:, None], t.right / cols[None, :], t.errors, metric="||diag(r) (W - W') diag(c)||_F^2"
        )
