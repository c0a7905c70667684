"""GFWSVD: generalised Fisher-weighted SVD with a Kronecker-factored Fisher F ~ A (x) B.

A = E[x x^T] (layer inputs), B = E[g g^T] (gradients of the loss at the layer output). With
A = Sa Sa^T and B = Sb Sb^T, the SVD of Sb^T W Sa truncated at r minimises
||Sb^T (W - W') Sa||_F^2 = vec(dW)^T (A (x) B) vec(dW), the Kronecker-Fisher quadratic form that
estimates the loss increase of the truncation (loss_scale 1): that is why its errors price ranks
across matrices directly. With B = I it is exactly svd-llm. With paired statistics (sequential
runs) the input side fits the dense model's output W x_d (linalg/whitening.py, right_whitened).
"""

from ..linalg.whitening import dense_target_offset, right_whitened, sqrt_factor
from .base import Method, Weighting, register


@register("gfwsvd")
class KroneckerFisherSVD(Method):
    needs_inputs = True
    needs_cov = True
    fits_dense_targets = True

    def weighting(self, weight, stats):
        options = self.options
        cov_damping = options.damping if options.cov_damping is None else options.cov_damping
        a = sqrt_factor(stats.inputs.mean_gram.to(weight.device), options.damping)
        b = sqrt_factor(stats.gradients.mean_cov.to(weight.device), cov_damping)
        left_weighted = b.factor.T @ weight
        matrix = right_whitened(left_weighted, stats.inputs, a)
        return Weighting(matrix, b.inverse_t_times, a.times_inverse,
                         metric="vec(dW)^T (A x B) vec(dW)", offset=dense_target_offset(left_weighted, stats.inputs, a, matrix),
                         price_left=self._price_left(stats, b, cov_damping))

    def _price_left(self, stats, b, cov_damping):
        """A B damped less (or more) for pricing than for factorising: a strongly damped B gives
        factors that generalise better, while the loss estimate wants B as measured. The error
        of factors truncated under B_f, in the metric of B_p: ||Sp^T Sf^-T U_{>r} S_{>r}||^2.
        With --dense-targets the offset stays in the factorisation's metric: an approximation."""
        price_damping = self.options.price_cov_damping
        if price_damping is None or price_damping == cov_damping:
            return None
        p = sqrt_factor(stats.gradients.mean_cov.to(b.factor.device), price_damping)
        return lambda columns: p.factor.T @ b.inverse_t_times(columns)

    def loss_scale(self, weight, stats):
        return 1.0
