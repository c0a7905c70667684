"""GFWSVD: generalised Fisher-weighted SVD with a Kronecker-factored Fisher F ~ A (x) B.

A = E[x x^T] (layer inputs), B = E[g g^T] (gradients of the loss at the layer output). With
A = Sa Sa^T and B = Sb Sb^T, the SVD of Sb^T W Sa truncated at r minimises
||Sb^T (W - W') Sa||_F^2 = vec(dW)^T (A (x) B) vec(dW), the Kronecker-Fisher quadratic form that
estimates the loss increase of the truncation; that is why its errors price ranks across
matrices. With B = I it is exactly svd-llm.
"""

from ..linalg.svd import truncated_svd
from ..linalg.whitening import sqrt_factor
from .base import Factorization, Method, register


@register("gfwsvd")
class KroneckerFisherSVD(Method):
    needs_inputs = True
    needs_gradients = True

    def factorize(self, weight, stats, max_rank):
        self._require(stats)
        damping = self.options.damping
        a = sqrt_factor(stats.inputs.mean_gram, damping)
        b = sqrt_factor(stats.gradients.mean_cov, damping)
        t = truncated_svd(b.factor.T @ weight.double() @ a.factor, max_rank)
        return Factorization(b.inverse.T @ t.left, t.right @ a.inverse, t.errors, metric="vec(dW)^T (A x B) vec(dW)")
