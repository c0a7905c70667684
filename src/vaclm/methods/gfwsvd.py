"""GFWSVD: generalised Fisher-weighted SVD with a Kronecker-factored Fisher F ~ A (x) B.

A = E[x x^T] (layer inputs), B = E[g g^T] (gradients of the loss at the layer output). With
A = Sa Sa^T and B = Sb Sb^T, the SVD of Sb^T W Sa truncated at r minimises
||Sb^T (W - W') Sa||_F^2 = vec(dW)^T (A (x) B) vec(dW), the Kronecker-Fisher quadratic form that
estimates the loss increase of the truncation (up to the constant unit of base.loss_scale): that
is why its errors price ranks across matrices directly. With B = I it is exactly svd-llm.
"""

from dataclasses import dataclass

from ..linalg.whitening import sqrt_factor
from ..options import option
from .base import Method, Weighting, register
from .svd_llm import check_damping


@dataclass(frozen=True)
class KroneckerOptions:
    damping: float = option(1e-6, "svd-llm/gfwsvd: relative damping of the input Gram: G + DAMPING * mean(diag G) * I")
    cov_damping: float | None = option(None, "gfwsvd: relative damping of the output-gradient covariance B "
                                             "(default: --damping)")

    def __post_init__(self):
        check_damping("damping", self.damping)
        check_damping("covariance damping", self.cov_damping)


@register("gfwsvd")
class KroneckerFisherSVD(Method):
    Options = KroneckerOptions
    needs_inputs = True
    needs_cov = True

    def weighting(self, weight, stats):
        options = self.options
        cov_damping = options.damping if options.cov_damping is None else options.cov_damping
        a = sqrt_factor(stats.inputs.mean_gram.to(weight.device), options.damping)
        b = sqrt_factor(stats.gradients.mean_cov.to(weight.device), cov_damping)
        return Weighting(b.factor.T @ weight @ a.factor, b.inverse_t_times, a.times_inverse,
                         metric="vec(dW)^T (A x B) vec(dW)")

    def loss_scale(self, weight, stats):
        return self._fisher_unit(stats)
